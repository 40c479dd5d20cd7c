"""Implicit feedback: every row a positive, negatives sampled per positive (seeded, a ratio, never one
of the user's items; uniform or popularity-weighted); the LM never sees a count as a rating; a usage
log trains end to end through the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from cocorec.cli import main
from cocorec.data import DataError, NegativeSampling, ProtocolConfig, prepare
from cocorec.data.protocol import SPLITS, _NegativeSampler
from tests.data.helpers import edit_spec, write_implicit


def _user_items(data, d):
    log = pd.read_csv(d / "usage.txt", sep="\t", dtype=str)
    index = {it: i + 1 for i, it in enumerate(data.item_ids)}
    return {u: {index[i] for i in g["app"]} for u, g in log.groupby("uid")}


@pytest.mark.parametrize("ratio", [None, 4])
def test_negatives_per_positive(tmp_path, cache_dir, ratio):
    d = write_implicit(tmp_path / "d", ratio=ratio)
    data = prepare(str(d))
    r = ratio or 2   # the documented default
    mine = _user_items(data, d)
    assert data.implicit and data.feedback["negatives"] == {"ratio": r, "strategy": "uniform", "seed": 42,
                                                            "popularity_from": None}
    for s in SPLITS:
        sp = data.split(s)
        groups = sp.label.reshape(-1, r + 1)             # each positive, then its r negatives
        assert (groups[:, 0] == 1).all() and (groups[:, 1:] == 0).all()
        assert data.stats()[s]["positive_rate"] == round(1 / (r + 1), 4)
        items = sp.item.reshape(-1, r + 1)
        for g in range(len(items)):
            row = g * (r + 1)
            user = data.user_ids[int(sp.user[row])]
            negs = items[g, 1:]
            assert len(set(negs.tolist())) == r                      # distinct within a positive
            assert not set(negs.tolist()) & mine[user]               # never one of the user's items
            for k in range(1, r + 1):   # same user, time, position and behaviour sequence as the positive
                assert sp.user[row + k] == sp.user[row] and sp.timestamp[row + k] == sp.timestamp[row]
                assert sp.position[row + k] == sp.position[row]
                assert (sp.hist_items[row + k] == sp.hist_items[row]).all()
    assert any(f"({r} per positive, uniform, seed 42)" in n for n in data.notes)


def test_same_seed_same_negatives_other_seed_others(tmp_path, cache_dir):
    d = write_implicit(tmp_path / "d")
    a = prepare(str(d), cache=False)
    b = prepare(str(d), cache=False)
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    c = prepare(str(d), ProtocolConfig(split_seed=7), cache=False)
    assert c.feedback["negatives"]["seed"] == 7
    pairs = [{(x.user_ids[int(u)], int(i)) for sp in x.splits.values() for u, i, y in zip(sp.user, sp.item, sp.label)
              if y == 0} for x in (a, c)]
    assert pairs[0] != pairs[1]


def test_sampler_is_seeded_per_user(cache_dir):
    neg = NegativeSampling(ratio=3, strategy="uniform")
    s = _NegativeSampler(neg, n_items=50, seed=1, weights=None, user_ids=["a", "b"], src="x")
    mine = np.array([1, 2, 3])
    first = s.draw(0, mine, 20)
    np.testing.assert_array_equal(first, s.draw(0, mine, 20))          # same seed, same user: same draws
    assert not np.array_equal(first, s.draw(1, mine, 20))               # another user: other draws
    other = _NegativeSampler(neg, n_items=50, seed=2, weights=None, user_ids=["a", "b"], src="x")
    assert not np.array_equal(first, other.draw(0, mine, 20))           # another seed: other draws
    assert first.shape == (20, 3) and not np.isin(first, mine).any() and (first > 0).all()


def test_popularity_sampling_follows_training_popularity(tmp_path, cache_dir):
    uni = prepare(str(write_implicit(tmp_path / "u", strategy="uniform", per_user=6)))
    d = write_implicit(tmp_path / "p", strategy="popularity", per_user=6)
    pop = prepare(str(d))
    assert pop.feedback["negatives"]["strategy"] == "popularity"
    # the documented weights: each item's interaction count among the train split's users
    log = pd.read_csv(d / "usage.txt", sep="\t", dtype=str)
    train_users = {pop.user_ids[u] for u in np.unique(pop.split("train").user)}
    index = {it: i + 1 for i, it in enumerate(pop.item_ids)}
    weights = np.bincount(log.loc[log["uid"].isin(train_users), "app"].map(index), minlength=pop.spec.n_items)

    def negatives(data):
        return np.concatenate([data.split(s).item[data.split(s).label == 0] for s in SPLITS])
    assert (weights[negatives(pop)] > 0).all()   # an item no training user interacted with is never drawn
    # popularity-drawn negatives are more popular than uniform ones (same data, same users; the users' own
    # items, the most popular ones, are excluded under both)
    assert weights[negatives(pop)].mean() > 1.3 * weights[negatives(uni)].mean()


@pytest.mark.parametrize("strategy", ["uniform", "popularity"])
def test_sampler_draws_in_proportion_to_the_weights(strategy):
    w = np.array([0.0, 1, 2, 4, 8, 0, 16, 1])      # item 0 is padding; item 5 was never seen in training
    mine = np.array([7])                            # the user's own item
    s = _NegativeSampler(NegativeSampling(ratio=1, strategy=strategy), n_items=len(w), seed=0,
                         weights=w if strategy == "popularity" else None, user_ids=["a"], src="x")
    freq = np.bincount(s.draw(0, mine, 20000).ravel(), minlength=len(w)) / 20000
    cand = np.array([0, 1, 1, 1, 1, 1, 1, 0], dtype=float)          # never padding, never the user's item
    if strategy == "popularity":
        cand *= w
    np.testing.assert_allclose(freq, cand / cand.sum(), atol=0.015)


def test_lm_history_never_shows_counts_as_ratings(tmp_path, cache_dir):
    d = write_implicit(tmp_path / "d")
    data = prepare(str(d))
    assert data.meta["has_ratings"] is False and data.domain.implicit
    assert data.feedback["count_column"] == "uses"
    assert data.feedback["count_meaning"] == "number of times the user opened the app"
    log = pd.read_csv(d / "usage.txt", sep="\t")
    for u in range(data.n_users):
        own = log[log["uid"] == data.user_ids[u]].sort_values("ts", kind="stable")
        counts = data.llm_history_counts(u)
        assert counts == own["uses"].head(len(counts)).astype(float).tolist()
        text = data.user_text[u]
        assert "/5" not in text and "rating" not in text and "liked" not in text
        assert "Apps the user interacted with" in text and "number of times the user opened the app" in text
        assert all(f"({int(c)})" in text for c in counts)
    # without a count column: the history lists what the user interacted with, nothing else
    plain = prepare(str(write_implicit(tmp_path / "plain", counts=False)))
    assert plain.llm_counts is None and plain.llm_history_counts(0) is None and plain.feedback["count_column"] is None
    assert "(" not in plain.user_text[0].split("\n")[1]
    assert plain.domain.feedback_meaning == "number of times the user opened the app"   # the spec's own words


def test_implicit_default_meaning_without_domain(tmp_path, cache_dir):
    d = edit_spec(write_implicit(tmp_path / "d"), lambda s: s.pop("domain"))
    data = prepare(str(d))
    assert data.domain.item_noun == "item" and data.domain.feedback == "implicit"
    assert data.domain.feedback_meaning == "number of times the user interacted with the item"


@pytest.mark.parametrize("edit,message", [
    (lambda s: s["interactions"].update(rating="uses"), r"dataset\.yaml: feedback: implicit takes no "
                                                        r"'interactions\.rating'"),
    (lambda s: s.update(positive_threshold=4), r"dataset\.yaml: positive_threshold applies to explicit ratings"),
])
def test_implicit_spec_errors(tmp_path, cache_dir, edit, message):
    d = edit_spec(write_implicit(tmp_path / "d"), edit)
    with pytest.raises(DataError, match=message):
        prepare(str(d))


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_bad_count_names_the_row(tmp_path, cache_dir, value):
    d = write_implicit(tmp_path / "d")
    log = pd.read_csv(d / "usage.txt", sep="\t", dtype=str)
    log.loc[3, "uses"] = value
    log.to_csv(d / "usage.txt", sep="\t", index=False)
    what = "is not a number" if value == "many" else "is not a positive number"
    with pytest.raises(DataError, match=rf"usage\.txt, row 5, column 'uses': count '{value}' {what}"):
        prepare(str(d))


def test_protocol_threshold_on_implicit_data_is_an_error(tmp_path, cache_dir):
    d = write_implicit(tmp_path / "d")
    with pytest.raises(DataError, match=r"protocol\.positive_threshold 3 does not apply to feedback: implicit"):
        prepare(str(d), ProtocolConfig(positive_threshold=3))


def test_user_with_every_item_is_an_error(tmp_path, cache_dir):
    d = write_implicit(tmp_path / "d", n_items=12, per_user=11, ratio=2)
    with pytest.raises(DataError, match=r"dataset\.yaml: user 'u\d+' leaves 1 items to sample as negatives, fewer "
                                        r"than negatives\.ratio 2"):
        prepare(str(d))


def _strict_json(text):
    def no_constant(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=no_constant)


def test_usage_log_trains_end_to_end_through_the_cli(tmp_path, cache_dir, capsys):
    d = write_implicit(tmp_path / "apps", n_users=24, per_user=10)
    assert main(["data", "stats", "--dataset", str(d)]) == 0
    out = capsys.readouterr().out
    assert "0.3333" in out and "implicit feedback: sampled" in out
    run_dir, results = tmp_path / "run", tmp_path / "results.jsonl"
    rc = main(["train", "--dataset", str(d), "--backbone", "deepfm", "--method", "base", "--epochs", "1",
               "--output", str(run_dir), "--results", str(results), "--quiet", "--set", "train.batch_size=128"])
    assert rc == 0
    m = _strict_json((run_dir / "metrics.json").read_text())
    for split in ("val", "test"):
        assert math.isfinite(m[split]["auc"]) and 0.0 <= m[split]["auc"] <= 1.0
        assert math.isfinite(m[split]["logloss"]) and m[split]["logloss"] > 0
        assert abs(m[split]["positive_rate"] - 1 / 3) < 1e-6
    assert (run_dir / "checkpoint" / "model.safetensors").is_file()
    lines = results.read_text().splitlines()
    assert len(lines) == 1 and _strict_json(lines[0])["metrics"]["test"]["n"] == m["test"]["n"]
