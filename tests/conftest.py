"""Shared test fixtures. Nothing in the suite may reach for the network."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads; two OpenMP threads on a busy 2-core box
    stall at every barrier (~30x slower). Runs that set ``train.threads`` change it for themselves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A per-session cache root so tests never touch the user's cache."""
    d = tmp_path_factory.mktemp("cocorec-cache")
    os.environ["COCOREC_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def ml100k(cache_dir: Path):
    """Real MovieLens-100K through the full protocol (skips if the data is not on this machine)."""
    from cocorec.data import DataError, prepare

    try:
        return prepare("ml-100k")
    except DataError as e:
        pytest.skip(f"ml-100k not available: {e}")


def write_generic(directory: Path, n_users: int = 30, n_items: int = 40, per_user: int = 12, seed: int = 0,
                  fmt: str = "csv") -> Path:
    """Write a small synthetic dataset in the generic format (used to test the loader and errors)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=per_user, replace=False)
        for t, i in enumerate(items):
            rows.append({"uid": f"u{u}", "iid": f"i{i}", "stars": int(rng.integers(1, 6)), "ts": 1_000_000 + 100 * t})
    inter = pd.DataFrame(rows)
    items = pd.DataFrame({"iid": [f"i{i}" for i in range(n_items)],
                          "name": [f"Item number {i}" for i in range(n_items)],
                          "year": [1990 + i % 20 for i in range(n_items)],
                          "genres": ["Drama|Comedy" if i % 2 else "Action" for i in range(n_items)],
                          "blurb": [f"blurb {i}" for i in range(n_items)]})
    users = pd.DataFrame({"uid": [f"u{u}" for u in range(n_users)],
                          "gender": ["F" if u % 2 else "M" for u in range(n_users)],
                          "age": [str(20 + 10 * (u % 4)) for u in range(n_users)]})
    ext = "csv" if fmt == "csv" else "parquet"
    for name, df in (("interactions", inter), ("items", items), ("users", users)):
        if fmt == "csv":
            df.to_csv(directory / f"{name}.{ext}", index=False)
        else:
            df.to_parquet(directory / f"{name}.{ext}", index=False)
    (directory / "dataset.yaml").write_text(
        f"name: toy\n"
        f"interactions: {{file: interactions.{ext}, user: uid, item: iid, rating: stars, timestamp: ts}}\n"
        f"items: {{file: items.{ext}, item: iid, title: name, year: year, tags: genres, text: [blurb]}}\n"
        f"users: {{file: users.{ext}, user: uid, profile: [gender, age], groups: [gender, age]}}\n")
    return directory
