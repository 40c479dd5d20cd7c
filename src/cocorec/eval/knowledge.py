"""Diagnostics of the knowledge a method feeds to a backbone: is it a per-user signal or a constant?

A knowledge vector that is nearly the same for every user can still be "used" by a backbone (as a
bias) while carrying nothing about the user. :func:`variance_shares` splits the mean squared norm of
the vectors fed over a split's samples into three exact parts: the constant (the global mean), the
variance *between* users (of the users' mean vectors) and the variance *within* users (e.g. an item
field). :func:`user_derangement` permutes the users of a split for the "knowledge permuted" control.

Example:
    >>> import numpy as np
    >>> k = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
    >>> s = variance_shares(k, np.array([0, 0, 1]))
    >>> round(s["constant_share"] + s["between_user_variance_share"] + s["within_user_variance_share"], 6)
    1.0
    >>> s["within_user_variance_share"]
    0.0
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cocorec.knowledge.sources import derangement

__all__ = ["user_derangement", "variance_shares"]


def variance_shares(k: np.ndarray, users: np.ndarray) -> dict[str, float]:
    """Shares of ``mean ||k_n||^2`` over samples: constant, between-user and within-user variance."""
    k = np.asarray(k, dtype=np.float64).reshape(len(k), -1)
    users = np.asarray(users)
    energy = float((k ** 2).sum(1).mean()) if len(k) else 0.0
    if energy == 0.0:
        return {"constant_share": 0.0, "between_user_variance_share": 0.0, "within_user_variance_share": 0.0,
                "mean_sq_norm": 0.0}
    mu = k.mean(0)
    _, inv, counts = np.unique(users, return_inverse=True, return_counts=True)
    sums = np.zeros((len(counts), k.shape[1]))
    np.add.at(sums, inv, k)
    means = sums / counts[:, None]
    between = float((((means - mu) ** 2).sum(1) * counts).sum() / len(k))
    within = float(((k - means[inv]) ** 2).sum(1).mean())
    return {"constant_share": float((mu ** 2).sum()) / energy, "between_user_variance_share": between / energy,
            "within_user_variance_share": within / energy, "mean_sq_norm": energy}


def user_derangement(n_users: int, split_users: np.ndarray, seed: int) -> np.ndarray:
    """``perm [n_users]``: the users of ``split_users`` deranged among themselves (seeded), others fixed."""
    perm = np.arange(n_users)
    split_users = np.unique(split_users)
    perm[split_users] = split_users[derangement(len(split_users), np.random.default_rng([int(seed), 7]))]
    return perm


def knowledge_report(fields: list[np.ndarray], projected: list[np.ndarray], users: np.ndarray,
                     names: list[str]) -> dict[str, Any]:
    """The shares of every field as the method outputs it and after the backbone's knowledge
    projection; the top-level share is over all fields' method outputs together."""
    out: dict[str, Any] = {}
    if fields:
        out.update(variance_shares(np.concatenate(fields, axis=1), users))
    out["fields"] = {n: {"method_output": variance_shares(f, users), "after_projection": variance_shares(p, users)}
                     for n, f, p in zip(names, fields, projected)}
    return out
