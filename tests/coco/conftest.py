"""Fixtures of the CoCo tests: a tiny synthetic dataset and a tiny random LM (no files, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.conftest import write_generic


@pytest.fixture(scope="session")
def toy_data(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from cocorec.data import prepare

    d = write_generic(tmp_path_factory.mktemp("coco-toy") / "toy", n_users=40, n_items=30, per_user=14, seed=3)
    return prepare(str(d))
