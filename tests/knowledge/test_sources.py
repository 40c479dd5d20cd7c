"""Knowledge sources: deterministic draws, exact corruption, derangements, named leaks, distinct caches,
one-line errors, and the direct-field method end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cocorec.cli import main
from cocorec.data.protocol import ProtocolConfig
from cocorec.knowledge.sources import LEAK, UserSource
from cocorec.train.run import RunConfig, run
from cocorec.train.trainer import TrainConfig
from tests.conftest import write_generic


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_generic(tmp_path_factory.mktemp("sources-toy") / "toy", n_users=40, n_items=24, per_user=12, seed=7)


@pytest.fixture(scope="module")
def toy(cache_dir: Path, toy_dir: Path):
    from cocorec.data import prepare

    return prepare(str(toy_dir))


def test_draws_are_deterministic_per_split_and_seed(toy, toy_dir):
    from cocorec.data import prepare

    def draw(data, seed):
        s = UserSource(data, "shuffled", 0.3, seed=seed)
        return s.knowledge_user.tolist(), s.corrupted.tolist()

    assert draw(toy, 0) == draw(toy, 0)
    assert draw(toy, 0) != draw(toy, 1)
    other_split = prepare(str(toy_dir), ProtocolConfig(split_seed=7))
    assert draw(other_split, 0) != draw(toy, 0)
    assert UserSource(toy, "oracle", seed=3).user_texts() == UserSource(toy, "oracle", seed=3).user_texts()


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_corrupt_marks_exactly_round_p_users(toy, p):
    s = UserSource(toy, "template", p, seed=2)
    assert int(s.corrupted.sum()) == round(p * toy.n_users)
    groups = s.groups()
    if p == 0:
        assert groups == {}
    else:
        assert groups["corrupt"].count("corrupted") == round(p * toy.n_users) and len(groups["corrupt"]) == toy.n_users


def test_shuffled_is_a_derangement_of_whole_users(toy):
    s = UserSource(toy, "shuffled", seed=5)
    perm = s.knowledge_user
    assert sorted(perm.tolist()) == list(range(toy.n_users)) and not np.any(perm == np.arange(toy.n_users))
    view = s.view()
    for u in range(toy.n_users):
        assert view.user_text[u] == toy.user_text[perm[u]]
        assert view.user_profile[u] == toy.user_profile[perm[u]] and view.llm_history(u) == toy.llm_history(perm[u])
    assert view.split("train") is toy.split("train")          # everything else is the data's own


def test_corruption_inverts_what_is_read(toy):
    s = UserSource(toy, "oracle", 0.5, seed=0)
    clean = UserSource(toy, "oracle", 0.0, seed=0)
    bad = np.flatnonzero(s.corrupted)
    good = np.flatnonzero(~s.corrupted)
    v, ref = s.vectors(), clean.vectors()
    np.testing.assert_allclose(v[bad], 1.0 - ref[bad], atol=1e-6)
    np.testing.assert_array_equal(v[good], ref[good])
    u = int(bad[0])
    assert s.history(u) == [(i, 6 - r) for i, r in toy.llm_history(u)]
    lm_view = UserSource(toy, "lm", 0.5, seed=0).view()
    assert lm_view.llm_history(u) == s.history(u) and lm_view.user_text[u] != toy.user_text[u]
    assert lm_view.user_text[int(good[0])] == toy.user_text[int(good[0])]
    tmpl = UserSource(toy, "template", 0.5, seed=0)
    assert tmpl.user_texts()[u] == tmpl.template_text(u, corrupted=True) != tmpl.template_text(u, corrupted=False)


def test_swap_gives_each_corrupted_user_another_corrupted_users_knowledge_unaltered(toy):
    swap = UserSource(toy, "oracle", 0.3, seed=4, corruption="swap")
    inv = UserSource(toy, "oracle", 0.3, seed=4)
    plain = UserSource(toy, "oracle", 0.0, seed=4)
    assert swap.corrupted.tolist() == inv.corrupted.tolist()          # the same users, only the kind differs
    assert swap.groups() == inv.groups() and swap.label == "oracle+swap0.3" and not swap.inverted.any()
    bad, good = np.flatnonzero(swap.corrupted), np.flatnonzero(~swap.corrupted)
    who = swap.knowledge_user
    assert sorted(who[bad].tolist()) == bad.tolist() and not np.any(who[bad] == bad)
    assert who[good].tolist() == good.tolist()
    np.testing.assert_array_equal(swap.vectors(), plain.vectors()[who])      # whole, uninverted vectors
    assert swap.user_texts() == [plain.user_texts()[int(v)] for v in who]
    lm_view = UserSource(toy, "lm", 0.3, seed=4, corruption="swap").view()
    u = int(bad[0])
    assert lm_view.llm_history(u) == toy.llm_history(int(who[u])) and lm_view.user_text[u] == toy.user_text[int(who[u])]
    again = UserSource(toy, "oracle", 0.3, seed=4, corruption="swap").knowledge_user
    assert again.tolist() == who.tolist()
    assert UserSource(toy, "oracle", 0.3, seed=5, corruption="swap").knowledge_user.tolist() != who.tolist()


def test_swap_runs_through_a_method_and_names_its_variant(toy, tmp_path):
    from cocorec.knowledge.base import build_method, method_label

    m = build_method("field", source="oracle", corrupt=0.3, corruption="swap")
    assert m.user_source(toy).label == "oracle+swap0.3" and m.config_dict()["corruption"] == "swap"
    assert "corruption" not in build_method("field", source="oracle", corrupt=0.3).config_dict()
    assert method_label("field", {"source": "oracle", "corrupt": 0.3, "corruption": "swap"}) == \
        "field[corrupt=0.3,corruption=swap,source=oracle]"
    assert method_label("coco", {"source": "oracle", "corrupt": 0.3}) == "coco[corrupt=0.3,source=oracle]"
    assert build_method("coco", lm="tiny", source="oracle", corrupt=0.3, corruption="swap").corruption == "swap"


def test_the_oracle_leak_is_named_in_every_config(toy):
    from cocorec.knowledge.base import build_method

    for name, kw in (("kar", dict(lm="tiny", encoder="tiny")), ("field", {}), ("coco", dict(lm="tiny"))):
        assert build_method(name, source="oracle", **kw).config_dict()["leak"] == LEAK
        assert "leak" not in build_method(name, source="template", **kw).config_dict()


def test_cache_keys_differ_per_source_and_corruption(toy, tmp_path):
    """KAR encodes (and caches by content) a different text per source; CoCo's shared user-text KV is
    keyed by the token ids the LM reads, so each source and corruption gets its own entries."""
    from cocorec.coco.kvcache import UserTextKVCache
    from cocorec.knowledge.lm import tiny_lm

    texts = {(src, p): UserSource(toy, src, p, seed=0).user_texts()
             for src in ("lm", "template", "oracle", "shuffled") for p in (0.0, 0.3)}
    assert len({tuple(t) for t in texts.values()}) == len(texts)
    lm = tiny_lm()
    dirs = {k: UserTextKVCache.from_texts(lm, t, storage="disk", dtype="float32", shared_dir=tmp_path / "kv").shared_dir
            for k, t in list(texts.items())[:3]}
    assert len(set(dirs.values())) == 3


@pytest.mark.parametrize("method, setting, message", [
    ("kar", "method.source=gpt", "unknown source 'gpt'"),
    ("kar", "method.corrupt=1.5", "corrupt must be a fraction in [0, 1]"),
    ("coco", "method.corrupt=-0.1", "corrupt must be a fraction in [0, 1]"),
    ("r4ec", "method.source=oracle", "method r4ec cannot take source 'oracle'"),
    ("field", "method.source=lm", "method field cannot take source 'lm'"),
    ("field", "method.view=words", "view must be one of ('full', 'text', 'rate')"),
    ("field", "method.corruption=flip", "unknown corruption 'flip' (one of invert, swap)"),
])
def test_bad_sources_are_one_line_errors_before_any_data(method, setting, message, tmp_path, capsys):
    # the dataset does not exist: the error must come from the setting, before any data is read
    code = main(["train", "--dataset", str(tmp_path / "no-such-data"), "--method", method, "--set", setting])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("name", ["toy", "ml100k"])   # ml-100k: 18 genres, of which the text names 6
def test_the_text_and_rate_views_of_the_oracle_hold_exactly_the_numbers_its_text_states(name, toy, request):
    import re

    data = toy if name == "toy" else request.getfixturevalue(name)
    src = UserSource(data, "oracle", 0.0, seed=0)
    tags = list(data.meta["tag_vocab"])
    full, text, only_rate = src.vectors("full"), src.vectors("text"), src.vectors("rate")
    assert full.shape == text.shape == only_rate.shape and not np.allclose(full, text)
    for u in range(0, data.n_users, max(1, data.n_users // 100)):
        said = src.oracle_text(u)
        rate = int(re.search(r"they liked (\d+)%", said).group(1)) / 100
        stated = re.findall(r"([A-Za-z][\w'-]*) (\d+)%", said.split(": ", 2)[-1])
        named = {tags.index(t): int(p) / 100 for t, p in stated}
        want = np.full(len(tags), rate)
        want[list(named)] = list(named.values())
        assert text[u, 0] == pytest.approx(rate) and np.allclose(text[u, 1:], want), said
        assert np.allclose(only_rate[u], rate), said   # the stated label rate and nothing else
        cols = [0] + [j + 1 for j in named]   # the stated numbers are the full view's, to a whole percent
        assert np.abs(full[u, cols] - text[u, cols]).max() <= 0.005 + 1e-6
    with pytest.raises(ValueError, match="oracle source only"):
        UserSource(toy, "template", 0.0, seed=0).vectors("text")


def test_field_method_carries_a_per_user_vector_and_permuting_it_is_measured(toy, tmp_path):
    cfg = RunConfig(dataset="toy", backbone="deepfm", method="field", seed=0, output=str(tmp_path / "run"),
                    results=str(tmp_path / "results.jsonl"), quiet=True,
                    train=TrainConfig(epochs=2, batch_size=64, threads=1), model={"hidden_units": (16,)},
                    method_args={"source": "template", "corrupt": 0.25})
    metrics = run(cfg, data=toy)
    for k in ("test", "test_no_knowledge", "test_knowledge_permuted"):
        assert 0.0 <= metrics[k]["auc"] <= 1.0
    k = metrics["diagnostics"]["knowledge"]
    assert k["within_user_variance_share"] == pytest.approx(0.0, abs=1e-9)        # one vector per user
    assert k["between_user_variance_share"] + k["constant_share"] == pytest.approx(1.0)
    assert set(k["fields"]["user"]) == {"method_output", "after_projection"}
    groups = metrics["groups"]
    assert set(groups["test"]["corrupt"]) <= {"corrupted", "clean"} and "corrupt" in groups["test_no_knowledge"]
    line = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])
    assert line["variant"] == "field[corrupt=0.25,source=template]" and line["split_seed"] == 42
    assert line["metrics"]["test_knowledge_permuted"]["auc"] == metrics["test_knowledge_permuted"]["auc"]
    # the vectors travel in the checkpoint: the scorer reproduces the run's test AUC without the source
    from cocorec.eval.metrics import auc
    from cocorec.serve import load_scorer

    probs = load_scorer(tmp_path / "run", data=toy).score_split("test")
    assert auc(toy.split("test").label, probs) == pytest.approx(metrics["test"]["auc"], abs=1e-6)


# ----------------------------------------------------------------------------- implicit feedback
@pytest.fixture(scope="module")
def apps(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A usage log: every row a positive with a use count; the spec declares the domain (apps)."""
    from cocorec.data import prepare
    from tests.data.helpers import write_implicit

    return prepare(str(write_implicit(tmp_path_factory.mktemp("sources-apps") / "apps", n_users=30, n_items=40)))


def _own_items(data, u):
    mine = {int(i) for i, _ in data.llm_history(u)}
    for s in ("train", "val", "test"):
        sp = data.split(s)
        mine |= set(sp.item[(sp.user == u) & (sp.label > 0)].tolist())
    return mine


def test_implicit_data_has_no_ratings_and_its_own_noun(apps, toy):
    from cocorec.knowledge.sources import has_ratings, item_noun

    assert apps.implicit and not has_ratings(apps) and item_noun(apps) == "app"
    assert has_ratings(toy) and item_noun(toy) == "item"
    # an object without a domain: MovieLens' noun for an ml- name, else the generic one
    assert item_noun(type("D", (), {"name": "ml-x"})()) == "movie" and item_noun(object()) == "item"


def test_implicit_shuffled_view_keeps_the_datas_wording_and_counts(apps):
    s = UserSource(apps, "shuffled", seed=1)
    view = s.view()
    for u in range(apps.n_users):
        v = int(s.knowledge_user[u])
        assert view.user_text[u] == apps.user_text[v]                       # counts and domain wording included
        assert view.llm_history_counts(u) == apps.llm_history_counts(v)
    assert "Apps the user interacted with" in view.user_text[0] and "/5" not in "".join(view.user_text)


def test_implicit_corruption_shows_foreign_items_never_low_ratings(apps):
    from cocorec.knowledge import kar

    s = UserSource(apps, "lm", 0.5, seed=0)
    view = s.view()
    bad, good = np.flatnonzero(s.corrupted), np.flatnonzero(~s.corrupted)
    for u in bad:
        u = int(u)
        h, own = s.history(u), apps.llm_history(u)
        assert len(h) == len(own) and {r for _, r in h} == {5}                # codes untouched: no "1" ratings
        assert not {i for i, _ in h} & _own_items(apps, u)                  # items the user never interacted with
        assert view.llm_history_counts(u) == apps.llm_history_counts(u)     # the user's own counts, in order
        assert view.user_text[u] != apps.user_text[u]
        prompt = kar.user_prompt(view, u)
        assert "interacted with these apps" in prompt and "rated" not in prompt and ": 1" not in prompt
        counts = "; ".join(f"({int(c)})" for c in apps.llm_history_counts(u))
        assert [x.rsplit(" ", 1)[1] for x in prompt.splitlines()[1].split("; ")] == counts.split("; ")
    for u in good:
        assert view.user_text[int(u)] == apps.user_text[int(u)] and s.history(int(u)) == apps.llm_history(int(u))
    again = UserSource(apps, "lm", 0.5, seed=0)
    assert [again.history(int(u)) for u in bad] == [s.history(int(u)) for u in bad]     # seeded
    other = UserSource(apps, "lm", 0.5, seed=1)
    u = int(np.flatnonzero(s.corrupted & other.corrupted)[0])
    assert other.history(u) != s.history(u)


def test_implicit_template_and_oracle_texts_speak_of_use_not_ratings(apps):
    tmpl = UserSource(apps, "template", 0.0, seed=0)
    t = tmpl.template_text(0)
    total = sum(apps.llm_history_counts(0))
    assert t.startswith(f"Interacted with {len(apps.llm_history(0))} apps (number of times the user opened the "
                        f"app: {int(total)} in all).")
    assert "Most frequent cat:" in t and "Highest number of times the user opened the app:" in t
    for word in ("Rated", "rating", "liked", "Disliked", "genre", "movie"):
        assert word not in t
    assert tmpl.template_text(0, corrupted=True) != t
    o = UserSource(apps, "oracle", 0.0, seed=0).oracle_text(0)
    assert o.startswith("Of the apps this user was shown, they interacted with 33%.") and "by cat:" in o
    assert "like" not in o
