"""Helpers of the data tests: edit a generic dataset's spec, write a tiny implicit-feedback dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import yaml


def edit_spec(directory: Path, fn: Callable[[dict[str, Any]], Any]) -> Path:
    """Load ``dataset.yaml``, let ``fn`` edit the dict in place, write it back."""
    p = Path(directory) / "dataset.yaml"
    spec = yaml.safe_load(p.read_text())
    fn(spec)
    p.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return Path(directory)


def write_implicit(directory: Path, n_users: int = 30, n_items: int = 40, per_user: int = 12, seed: int = 0,
                   counts: bool = True, strategy: str | None = None, ratio: int | None = None) -> Path:
    """A tiny usage log (every row a positive, with a use count) in the generic format, tab-separated in a
    ``.txt`` file. Items are drawn with popularity falling with their index (as real logs)."""
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pop = 1.0 / np.arange(1, n_items + 1)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=per_user, replace=False, p=pop / pop.sum())
        for t, i in enumerate(items):
            rows.append({"uid": f"u{u}", "app": f"a{i}", "uses": int(rng.integers(1, 60)), "ts": 5_000 + 60 * t})
    log = pd.DataFrame(rows)
    if not counts:
        log = log.drop(columns="uses")
    log.to_csv(directory / "usage.txt", sep="\t", index=False)
    pd.DataFrame({"app": [f"a{i}" for i in range(n_items)], "name": [f"App {i}" for i in range(n_items)],
                  "cat": ["games" if i % 3 else "tools" for i in range(n_items)]}).to_csv(directory / "apps.csv",
                                                                                          index=False)
    pd.DataFrame({"uid": [f"u{u}" for u in range(n_users)],
                  "country": ["FR" if u % 2 else "DE" for u in range(n_users)]}).to_csv(directory / "users.csv",
                                                                                       index=False)
    spec: dict[str, Any] = {
        "name": "apps", "feedback": "implicit",
        "interactions": {"file": "usage.txt", "sep": "\t", "user": "uid", "item": "app", "timestamp": "ts"},
        "items": {"file": "apps.csv", "item": "app", "title": "name", "tags": "cat"},
        "users": {"file": "users.csv", "user": "uid", "profile": ["country"]},
        "domain": {"item_noun": "app", "feedback_meaning": "number of times the user opened the app",
                   "factors": ["category", "purpose", "price"], "profile_fields": {"country": "from {value}"}},
    }
    if counts:
        spec["interactions"]["count"] = "uses"
    neg = {k: v for k, v in (("ratio", ratio), ("strategy", strategy)) if v is not None}
    if neg:
        spec["negatives"] = neg
    (directory / "dataset.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return directory
