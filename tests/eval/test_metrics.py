from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from cocorec.eval.metrics import auc, gauc, group_metrics, logloss, rela_impr


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    s = np.round(rng.random(1000) + 0.3 * y, 1)  # many ties
    assert abs(auc(y, s) - roc_auc_score(y, s)) < 1e-12


def test_logloss_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    p = rng.random(500) * 0.98 + 0.01
    assert abs(logloss(y, p) - log_loss(y, p)) < 1e-9


def test_gauc_weights_by_samples_and_skips_one_class_users():
    y = np.array([1, 0, 1, 0, 1, 1, 1])
    s = np.array([0.9, 0.1, 0.2, 0.8, 0.5, 0.4, 0.3])
    u = np.array([0, 0, 1, 1, 1, 2, 2])  # user 2 has one class
    a0 = roc_auc_score(y[:2], s[:2])
    a1 = roc_auc_score(y[2:5], s[2:5])
    assert abs(gauc(y, s, u) - (a0 * 2 + a1 * 3) / 5) < 1e-12


def test_group_metrics():
    y = np.array([1, 0, 1, 0, 1, 0])
    s = np.array([0.9, 0.1, 0.8, 0.2, 0.1, 0.9])
    u = np.array([0, 0, 1, 1, 2, 2])
    res = group_metrics(y, s, u, {"g": ["a", "a", "b"]}, min_samples=1)
    assert res["g"]["a"]["auc"] == 1.0 and res["g"]["b"]["auc"] == 0.0
    assert res["g"]["a"]["n"] == 4 and res["g"]["a"]["users"] == 2


def test_rela_impr():
    assert abs(rela_impr(0.76, 0.75) - 4.0) < 1e-9
