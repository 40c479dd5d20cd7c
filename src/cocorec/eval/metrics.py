"""CTR metrics. AUC is computed from ranks (ties averaged), identical to scikit-learn's.

Example:
    >>> import numpy as np
    >>> auc(np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.6, 0.4]))
    1.0
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y > 0.5].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
    """Per-user AUC weighted by the user's sample count; users with one class are skipped."""
    y, s, u = np.asarray(labels), np.asarray(scores), np.asarray(users)
    order = np.argsort(u, kind="stable")
    y, s, u = y[order], s[order], u[order]
    bounds = np.flatnonzero(np.r_[True, u[1:] != u[:-1], True])
    total, weight = 0.0, 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        v = auc(y[a:b], s[a:b])
        if not np.isnan(v):
            total += v * (b - a)
            weight += b - a
    return float(total / weight) if weight else float("nan")


def evaluate_predictions(labels: np.ndarray, probs: np.ndarray, users: np.ndarray) -> dict[str, float]:
    return {"auc": auc(labels, probs), "logloss": logloss(labels, probs), "gauc": gauc(labels, probs, users),
            "n": int(len(labels)), "positive_rate": float(np.mean(labels)) if len(labels) else float("nan")}


def group_metrics(labels: np.ndarray, probs: np.ndarray, users: np.ndarray,
                  user_groups: Mapping[str, Sequence[str]], min_samples: int = 20) -> dict[str, dict[str, Any]]:
    """Metrics per user group: {grouping: {group label: {auc, logloss, gauc, n, users}}}.

    ``user_groups`` maps a grouping name (e.g. "gender x age_group") to a label per user index.
    Groups with fewer than ``min_samples`` samples are reported with their count but no AUC.
    """
    out: dict[str, dict[str, Any]] = {}
    users = np.asarray(users)
    for grouping, per_user in user_groups.items():
        labels_of_user = np.asarray(per_user, dtype=object)[users]
        res: dict[str, Any] = {}
        for g in sorted(set(labels_of_user.tolist())):
            m = labels_of_user == g
            n = int(m.sum())
            entry: dict[str, Any] = {"n": n, "users": int(len(np.unique(users[m])))}
            if n >= min_samples:
                entry.update(auc=auc(labels[m], probs[m]), logloss=logloss(labels[m], probs[m]),
                             gauc=gauc(labels[m], probs[m], users[m]))
            res[g] = entry
        out[grouping] = res
    return out


def rela_impr(model_auc: float, base_auc: float) -> float:
    """RelaImpr (Yan et al. 2014): relative AUC improvement over a base, measured from 0.5, in %."""
    return float(((model_auc - 0.5) / (base_auc - 0.5) - 1.0) * 100.0)
