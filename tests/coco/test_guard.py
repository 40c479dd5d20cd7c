"""The group guard's decisions on hand-made validation scores."""

from __future__ import annotations

import numpy as np

from cocorec.coco.guard import guard_decisions


def _scores(rng: np.random.Generator, n: int, signal: float) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n).astype(float)
    return y, 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(size=n))))


def test_guard_switches_off_the_group_knowledge_harms_and_nothing_else():
    rng = np.random.default_rng(0)
    y, p_without = _scores(rng, 2000, 0.5)
    groups = np.repeat([0, 1, 2], [800, 800, 400])
    p_with = p_without.copy()
    flip = groups == 1                                  # "corrupted": knowledge pushes the wrong way
    p_with[flip] = np.clip(p_without[flip] - 0.3 * (2 * y[flip] - 1), 0.01, 0.99)
    better = groups == 0                                # "clean": knowledge helps
    p_with[better] = np.clip(p_without[better] + 0.1 * (2 * y[better] - 1), 0.01, 0.99)
    rep = guard_decisions(y, p_with, p_without, groups, ["clean", "corrupted", "other"], 0.005, 200)
    assert rep["disabled"] == ["corrupted"]
    assert rep["groups"]["corrupted"]["harmed"] and not rep["groups"]["clean"]["harmed"]
    assert rep["val_auc_guarded"] > rep["val_auc_all_on"]


def test_guard_keeps_a_harmed_group_below_min_samples_on():
    rng = np.random.default_rng(1)
    y, p_without = _scores(rng, 600, 0.5)
    groups = np.repeat([0, 1], [500, 100])
    p_with = p_without.copy()
    p_with[groups == 1] = 1 - p_without[groups == 1]
    rep = guard_decisions(y, p_with, p_without, groups, ["a", "b"], 0.005, 200)
    assert rep["disabled"] == [] and rep["groups"]["b"]["n"] == 100 and not rep["groups"]["b"]["harmed"]


def test_guard_refuses_a_switch_off_that_lowers_the_overall_auc():
    # group 1's own ranking is better without knowledge, but its scores without knowledge sit on
    # another scale than group 0's, so mixing them would lower the overall AUC: knowledge stays on
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0], dtype=float)
    groups = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p_with = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.85, 0.15, 0.75, 0.35, 0.3, 0.6])
    p_without = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.97, 0.96, 0.98, 0.95, 0.99, 0.94])
    rep = guard_decisions(y, p_with, p_without, groups, ["a", "b"], 0.005, 1)
    assert rep["groups"]["b"]["harmed"] and rep["disabled"] == []
    assert rep["groups"]["b"]["overall_auc_if_off"] < rep["val_auc_all_on"]


def test_bootstrap_guard_catches_a_small_consistent_harm_the_margin_lets_through():
    # 200 users per group; knowledge lowers group 1's AUC by ~0.003 on every user, a hair under
    # the 0.005 margin; group 0 is untouched apart from noise
    rng = np.random.default_rng(3)
    users = np.repeat(np.arange(400), 20)
    groups = (users >= 200).astype(int)
    y, p_without = _scores(rng, len(users), 0.5)
    p_with = p_without + rng.normal(scale=1e-3, size=len(users))
    bad = groups == 1
    p_with[bad] = p_without[bad] - 0.0015 * (2 * y[bad] - 1) + rng.normal(scale=1e-3, size=int(bad.sum()))
    names = ["clean", "corrupted"]
    margin = guard_decisions(y, p_with, p_without, groups, names, 0.005, 200)
    assert margin["disabled"] == []
    drop = margin["groups"]["corrupted"]["auc_without"] - margin["groups"]["corrupted"]["auc_with"]
    assert 0 < drop < 0.005
    boot = guard_decisions(y, p_with, p_without, groups, names, 0.005, 200, test="bootstrap", users=users)
    assert boot["disabled"] == ["corrupted"] and boot["groups"]["corrupted"]["harm_share"] >= 0.95
    assert boot["groups"]["clean"]["harm_share"] < 0.95 and not boot["groups"]["clean"]["harmed"]
    again = guard_decisions(y, p_with, p_without, groups, names, 0.005, 200, test="bootstrap", users=users)
    assert again["groups"]["corrupted"]["harm_share"] == boot["groups"]["corrupted"]["harm_share"]   # seeded
