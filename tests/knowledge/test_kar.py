"""KAR / R4ec: generation cache (hit, miss, resume after a kill, stale keys), vectors, methods end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cocorec.cli import main
from cocorec.knowledge import kar
from cocorec.knowledge import prompts as P
from cocorec.knowledge.base import build_method
from cocorec.knowledge.encoder import TextEncoder
from cocorec.knowledge.kar import KarMethod, KnowledgeStore, R4ecMethod
from cocorec.knowledge.lm import tiny_lm
from cocorec.train.run import RunConfig, run
from cocorec.train.trainer import TrainConfig
from cocorec.utils.io import key_of
from tests.conftest import write_generic


class FakeLM:
    """Deterministic stand-in for an LM: the text is a hash of the whole prompt (tiny_lm truncates long
    prompts to their last tokens, so different prompts with the same ending would give the same text)."""

    def __init__(self, identity: str = "fake:lm"):
        self.identity = identity
        self.device = torch.device("cpu")

    def generate(self, prompts, **kw):
        return [f"{self.identity} says {key_of(p)}" for p in prompts]


class CountingLM:
    """Wraps an LM: counts generate calls and prompts; optionally "dies" after ``fail_after`` calls."""

    def __init__(self, lm=None, fail_after: int | None = None):
        self.lm = lm or FakeLM()
        self.identity = self.lm.identity
        self.device = self.lm.device
        self.calls = 0
        self.prompts: list[str] = []
        self.fail_after = fail_after

    def generate(self, prompts, **kw):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.prompts += list(prompts)
        return self.lm.generate(prompts, **kw)


class CountingEncoder:
    identity = "encoder:tiny-bert:32:0:mean:len128"

    def __init__(self):
        self.enc = None  # built on first use: the generation-cache tests never need it
        self.texts: list[str] = []

    def encode(self, texts, **kw):
        self.enc = self.enc or TextEncoder.tiny(dim=32)
        assert self.enc.identity == self.identity
        self.texts += list(texts)
        return self.enc.encode(texts, **kw)


@pytest.fixture(scope="module")
def toy(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """30 users x 12 interactions (6 in the LM history each), 20 items."""
    from cocorec.data import prepare

    d = write_generic(tmp_path_factory.mktemp("kar-toy") / "toy", n_users=30, n_items=20, per_user=12, seed=5)
    return prepare(str(d))


PROMPTS = [f"Describe the movie number {k} in 3 sentences." for k in range(12)]


def _store(root, lm=None, **kw) -> KnowledgeStore:
    kw.setdefault("max_new_tokens", 4)
    kw.setdefault("batch_size", 4)
    return KnowledgeStore(lm or CountingLM(), CountingEncoder(), root=root, **kw)


# -- the generation cache ------------------------------------------------------------------------------
def test_cache_miss_then_hit(tmp_path):
    a = _store(tmp_path)
    first = a.generate("user", PROMPTS)
    assert a.lm.calls == 3 and len(a.lm.prompts) == 12 and a.stats["user"] == {"generated": 12, "cached": 0}
    b = _store(tmp_path)  # a new process: reads the disk cache
    assert b.generate("user", PROMPTS) == first
    assert b.lm.calls == 0 and b.stats["user"] == {"generated": 0, "cached": 12}
    # a partial overlap generates only the new prompts
    more = PROMPTS[:5] + ["Describe the movie number 99."]
    c = _store(tmp_path)
    assert c.generate("user", more)[:5] == first[:5]
    assert c.lm.prompts == ["Describe the movie number 99."]
    assert b.count_cached("user", more) == (6, 5)


def test_generation_logs_what_it_generated_and_how_long_it_took(tmp_path):
    said: list[str] = []
    store = _store(tmp_path, log=said.append)
    store.generate("user", PROMPTS)
    assert said[0] == "user: generating 12 of 12 texts (0 cached) in 3 batches of 4"
    assert said[1].startswith("user: first batch took ") and said[-1].startswith("user: generated 12 texts in ")
    assert said[-1].endswith(" s a batch)") and len(said) == 3
    store.generate("user", PROMPTS)   # all cached: nothing generated, nothing said
    assert len(said) == 3


def test_generation_in_a_log_writes_progress_lines_with_an_eta(tmp_path, capsys):
    _store(tmp_path / "a", progress=None).generate("user", PROMPTS)   # stderr is not a terminal here
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("generate user:   0% 0/12 text [00:00<?]")
    assert lines[-1].startswith("generate user: 100% 12/12 text [") and "<" in lines[-1]
    _store(tmp_path / "b", progress=False).generate("user", PROMPTS)
    assert capsys.readouterr().err == ""


def test_killed_run_resumes_with_only_the_missing_prompts(tmp_path):
    dying = _store(tmp_path / "c", lm=CountingLM(fail_after=2))  # killed during the 3rd of 3 batches
    with pytest.raises(KeyboardInterrupt):
        dying.generate("item", PROMPTS, batch_size=4)
    assert dying.lm.calls == 2
    resumed = _store(tmp_path / "c")
    texts = resumed.generate("item", PROMPTS, batch_size=4)
    assert resumed.lm.calls == 1 and len(resumed.lm.prompts) == 4
    assert resumed.stats["item"] == {"generated": 4, "cached": 8}
    fresh = _store(tmp_path / "other")
    assert fresh.generate("item", PROMPTS, batch_size=4) == texts  # same result as an uninterrupted run


def test_stale_cache_is_never_reused(tmp_path, monkeypatch):
    _store(tmp_path).generate("user", PROMPTS[:3])
    other_lm = _store(tmp_path, lm=CountingLM(FakeLM("fake:other")))  # another LM identity
    other_lm.generate("user", PROMPTS[:3])
    assert len(other_lm.lm.prompts) == 3
    longer = _store(tmp_path, max_new_tokens=5)  # different generation settings
    longer.generate("user", PROMPTS[:3])
    assert len(longer.lm.prompts) == 3
    monkeypatch.setitem(P.TEMPLATE_VERSIONS, "user", "kar-user-v999")  # a changed template
    bumped = _store(tmp_path)
    bumped.generate("user", PROMPTS[:3])
    assert len(bumped.lm.prompts) == 3
    monkeypatch.undo()
    same = _store(tmp_path)
    same.generate("user", PROMPTS[:3])
    assert same.lm.prompts == []  # back to the original key: still cached
    # a different kind (item facts) is its own namespace, even for the same prompt
    kind = _store(tmp_path)
    kind.generate("item", PROMPTS[:3])
    assert len(kind.lm.prompts) == 3


def test_vectors_are_cached_per_encoder_and_text(tmp_path, toy):
    s = _store(tmp_path)
    v1 = s.item_vectors(toy, [1, 2, 3])
    assert v1.shape == (3, 32) and v1.dtype == np.float32
    n_encoded = len(s.encoder.texts)
    assert n_encoded >= 1
    s2 = _store(tmp_path)
    np.testing.assert_array_equal(s2.item_vectors(toy, [1, 2, 3]), v1)
    assert s2.encoder.texts == [] and s2.lm.prompts == []


def test_user_encoder_input_is_generation_plus_history(tmp_path, toy):
    s = _store(tmp_path)
    s.user_vectors(toy, [0])
    hist = kar.user_history_part(toy, 0)
    (text,) = s.encoder.texts
    assert text.endswith(hist) and text.startswith(s.cached("user", kar.user_prompt(toy, 0), kar.system_message(toy)))
    titles = [toy.item_info[i]["title"] for i, _ in toy.llm_history(0)]
    prompt = kar.user_prompt(toy, 0)
    assert all(t in prompt for t in titles)
    assert all(f"{toy.item_info[i]['title']}: {r}" in prompt for i, r in toy.llm_history(0))


def test_r4ec_reflect_and_refine_rounds_count_calls(tmp_path, toy):
    users = list(range(6))
    s = _store(tmp_path, batch_size=8)
    chains = s.r4ec_chain(toy, users, rounds=2)
    # 6 reasoning + 2 rounds x (6 reflections + 6 refinements), one batch each
    assert s.lm.calls == 5 and len(s.lm.prompts) == 6 + 2 * 12
    assert all(len(ch) == 3 and set(ch[1]) == {"reflection", "refined"} for ch in chains)
    reflect_prompts = s.lm.prompts[6:12]  # generation order is longest-first, not user order
    for j, u in enumerate(users):
        assert any(chains[j][0]["reasoning"] in p and kar.user_history_part(toy, u) in p for p in reflect_prompts)
        assert chains[j][1]["refined"] != chains[j][0]["reasoning"] != chains[j][2]["refined"]
    s2 = _store(tmp_path, batch_size=8)  # everything cached, also kar's reasoning
    assert s2.user_texts(toy, users, "r4ec", rounds=2) == [ch[-1]["refined"] for ch in chains]
    assert s2.user_texts(toy, users, "kar") == [ch[0]["reasoning"] for ch in chains]
    assert s2.lm.calls == 0


# -- the methods ---------------------------------------------------------------------------------------
def _patch_models(monkeypatch, tmp_path) -> list[CountingLM]:
    """make_lm -> a counting tiny LM; a fresh knowledge cache for this test."""
    made: list[CountingLM] = []
    monkeypatch.setenv("COCOREC_CACHE", str(tmp_path / "cache"))

    def fake_lm(name, **kw):
        assert name == "tiny"
        made.append(CountingLM(tiny_lm(seed=0)))
        return made[-1]

    monkeypatch.setattr(kar, "make_lm", fake_lm)
    return made


@pytest.mark.parametrize("backbone", ["din", "dcnv2"])
def test_kar_trains_end_to_end_and_checkpoint_round_trips(backbone, toy, tmp_path, monkeypatch):
    made = _patch_models(monkeypatch, tmp_path)
    cfg = RunConfig(dataset="toy", backbone=backbone, method="kar", seed=0, output=str(tmp_path / "run"),
                    results=str(tmp_path / "results.jsonl"), quiet=True,
                    train=TrainConfig(epochs=1, batch_size=64, threads=1),
                    model={"hidden_units": (16, 8)} if backbone == "din" else {"hidden_units": (16,)},
                    method_args={"lm": "tiny", "encoder": "tiny", "max_new_tokens": 4, "batch_size": 32})
    metrics = run(cfg, data=toy)
    assert made and made[0].calls > 0
    assert np.isfinite(metrics["test"]["auc"]) and "test_no_knowledge" in metrics
    diag = metrics["diagnostics"]
    assert diag["lm"] == made[0].identity and len(diag["mean_gates"]["user"]) == 4
    assert json.loads((tmp_path / "run" / "knowledge.json").read_text())["texts"]["user"]["generated"] == toy.n_users
    ck = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    assert ck["knowledge_dims"] == [32, 32] and ck["method"] == "kar"

    # The vectors travel in the checkpoint: a fresh method scores without LM or encoder.
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    state = {k[len("method/"):]: v for k, v in tensors.items() if k.startswith("method/")}
    assert state["user_vec"].shape == (toy.n_users, 32) and state["item_vec"].shape == (toy.spec.n_items, 32)
    assert torch.all(state["item_vec"][0] == 0)
    fresh = KarMethod(lm="tiny", encoder="tiny")
    fresh.load_checkpoint_state(state)
    batch = toy.batch("test", np.arange(5))
    torch.manual_seed(0)
    trained = KarMethod(lm="tiny", encoder="tiny")
    trained.load_checkpoint_state(state)
    for a, b in zip(fresh(batch), trained(batch)):
        torch.testing.assert_close(a, b)
    assert fresh(batch)[0].shape == (5, 32)
    # a second run finds every text in the cache: the LM generates nothing
    run(cfg.__class__(**{**cfg.__dict__, "output": str(tmp_path / "run2")}), data=toy)
    assert made[-1].calls == 0


def test_r4ec_method_uses_refined_text(toy, tmp_path, monkeypatch):
    made = _patch_models(monkeypatch, tmp_path)
    m = build_method("r4ec", lm="tiny", encoder="tiny", max_new_tokens=4, batch_size=64, rounds=1)
    assert isinstance(m, R4ecMethod) and m.knowledge_dims == [32, 32]
    m.prepare(toy, tmp_path)
    lm = made[0]
    n = toy.n_users
    n_items = len({kar.item_prompt(toy, i) for i in range(1, toy.spec.n_items)})
    assert len(lm.prompts) == 3 * n + n_items  # reasoning + reflection + refinement per user, facts per item
    info = json.loads((tmp_path / "knowledge.json").read_text())
    assert info["texts"]["reflect"]["generated"] == n and info["texts"]["refine"]["generated"] == n
    assert m.config_dict()["rounds"] == 1 and m.config_dict()["lm"] == lm.identity
    out = m(toy.batch("train", np.arange(4)))
    assert [tuple(o.shape) for o in out] == [(4, 32), (4, 32)]


def test_standardize_option_uses_training_users_and_keeps_the_padding_item(toy, tmp_path, monkeypatch):
    _patch_models(monkeypatch, tmp_path)
    raw = KarMethod(lm="tiny", encoder="tiny", max_new_tokens=4, batch_size=64)
    raw.prepare(toy)
    std = KarMethod(lm="tiny", encoder="tiny", max_new_tokens=4, batch_size=64, standardize=True)
    std.prepare(toy)  # everything cached by now
    train = np.unique(toy.split("train").user)
    u_raw, u = raw.user_vec.numpy(), std.user_vec.numpy()
    np.testing.assert_allclose(u[train].mean(0), 0, atol=1e-4)
    expected = (u_raw - u_raw[train].mean(0)) / (u_raw[train].std(0) + 1e-6)
    np.testing.assert_allclose(u, expected, rtol=1e-4, atol=1e-4)
    assert torch.all(std.item_vec[0] == 0) and torch.all(raw.item_vec[0] == 0)


def test_forward_before_prepare_explains(toy):
    with pytest.raises(RuntimeError, match="prepare"):
        KarMethod(lm="tiny", encoder="tiny")(toy.batch("train", np.arange(2)))


def test_config_keys_are_checked_by_the_run_config():
    from cocorec.config import ConfigError

    cfg = RunConfig(method="r4ec").with_overrides({"method": {"rounds": "2", "hidden": "64,16", "lm": "tiny"}})
    assert cfg.method_args == {"rounds": 2, "hidden": (64, 16), "lm": "tiny"}
    with pytest.raises(ConfigError):
        RunConfig(method="kar").with_overrides({"method": {"rounds": "2"}})  # kar has no rounds


def test_cli_generate_and_show(toy, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COCOREC_CACHE", str(tmp_path / "cache"))   # the counts below need a cold cache
    d = write_generic(tmp_path / "toycli", n_users=20, n_items=10, per_user=8, seed=1)
    common = ["--dataset", str(d), "--lm", "tiny", "--max-new-tokens", "4", "--threads", "1"]
    assert main(["knowledge", "generate", *common, "--method", "r4ec", "--encoder", "tiny", "--limit-users", "5",
                 "--limit-items", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "user reasoning 5 (0 of 5 cached)" in out and "item facts 3 (0 of 3 cached)" in out
    assert "reflect 5 new" in out and "refine 5 new" in out
    assert main(["knowledge", "generate", *common, "--method", "kar", "--encoder", "tiny", "--limit-users", "5",
                 "--limit-items", "3", "--quiet"]) == 0
    assert "user reasoning 0 (5 of 5 cached)" in capsys.readouterr().out
    assert main(["knowledge", "show", *common, "--method", "r4ec", "--user", "u0", "--item", "i1"]) == 0
    out = capsys.readouterr().out
    assert "== user u0: prompt ==" in out and "round 1: reflection" in out and "round 1: refinement" in out
    assert "not generated yet" not in out.split("== item")[0]
    assert main(["knowledge", "show", *common, "--user", "nobody"]) == 2
    assert "nobody" in capsys.readouterr().err


def test_item_field_only_skips_user_generation_and_round_trips(toy, tmp_path, monkeypatch):
    made = _patch_models(monkeypatch, tmp_path)
    cfg = RunConfig(dataset="toy", backbone="deepfm", method="kar", seed=0, output=str(tmp_path / "run"),
                    results=str(tmp_path / "results.jsonl"), quiet=True,
                    train=TrainConfig(epochs=1, batch_size=64, threads=1)).with_overrides(
        {"method": {"lm": "tiny", "encoder": "tiny", "max_new_tokens": "4", "fields": "item"}})
    metrics = run(cfg, data=toy)
    n_items = len({kar.item_prompt(toy, i) for i in range(1, toy.spec.n_items)})
    assert len(made[0].prompts) == n_items                                # item facts only, no user reasoning
    assert np.isfinite(metrics["test"]["auc"]) and list(metrics["diagnostics"]["mean_gates"]) == ["item"]
    ck = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    assert ck["knowledge_dims"] == [32] and ck["method_args"]["fields"] == "item"
    from cocorec.serve.scorer import load_scorer

    scorer = load_scorer(tmp_path / "run", data=toy)                      # rebuilt from the checkpoint alone
    batch = toy.batch("test", np.arange(6))
    assert scorer.method.user_vec.shape[0] == 0 and [tuple(o.shape) for o in scorer.method(batch)] == [(6, 32)]
    probs = scorer.score_split("test")
    np.testing.assert_allclose(probs, np.concatenate(
        [scorer.score_batch(b) for b in toy.batches("test", 8192)]))
    with pytest.raises(ValueError, match="fields"):
        KarMethod(lm="tiny", encoder="tiny", fields="users")
    with pytest.raises(ValueError, match="fields"):
        KarMethod(lm="tiny", encoder="tiny", fields="")


def test_kar_item_is_kar_with_the_item_field_fixed():
    from cocorec.config import ConfigError

    m = build_method("kar-item", lm="tiny", encoder="tiny")
    assert isinstance(m, KarMethod) and m.name == "kar-item" and m.fields == ("item",) and m.knowledge_dims == [32]
    assert RunConfig(method="kar-item").with_overrides({"method": {"hidden": "64,16"}}).method_args == {
        "hidden": (64, 16)}
    with pytest.raises(ConfigError):
        RunConfig(method="kar-item").with_overrides({"method": {"fields": "user"}})   # fixed by the variant


def test_a_methods_initial_weights_follow_the_runs_seed_not_the_process_history():
    from cocorec.knowledge.base import build_method

    def weights(seed: int) -> list[torch.Tensor]:
        return [p.detach().clone() for p in build_method("kar", seed=seed, lm="tiny", encoder="tiny").parameters()]

    first = weights(0)
    torch.rand(1000)                      # another run drew from the global stream in between
    state = torch.random.get_rng_state()
    again = weights(0)
    assert torch.equal(torch.random.get_rng_state(), state)   # building a method leaves the stream alone
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, weights(1)))
