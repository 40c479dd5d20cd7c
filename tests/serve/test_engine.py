"""The bundle's frozen TorchScript backbone (``BundleScorer(jit=True)``, what the service runs) gives the
eager backbone's scores on every backbone: known and unknown users, any number of candidates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cocorec.models import MODELS
from cocorec.serve.bundle import BundleScorer, export_bundle
from cocorec.train.run import RunConfig, run
from cocorec.train.trainer import TrainConfig
from tests.conftest import write_generic


@pytest.fixture(scope="module")
def toy(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_generic(tmp_path_factory.mktemp("engine-toy") / "toy", n_users=30, n_items=20, per_user=12,
                             seed=3))


@pytest.mark.parametrize("backbone", sorted(MODELS))
def test_the_frozen_backbone_scores_as_the_eager_one(toy, tmp_path, backbone):
    run(RunConfig(dataset=toy, backbone=backbone, method="field", seed=0, output=str(tmp_path / "run"),
                  results=None, quiet=True, train=TrainConfig(epochs=1, batch_size=64, threads=1),
                  method_args={"source": "template"}))
    export_bundle(tmp_path / "run", tmp_path / "bundle")
    fast, slow = BundleScorer(tmp_path / "bundle"), BundleScorer(tmp_path / "bundle", jit=False)
    assert slow.engine == "eager"
    if backbone == "din":   # the served backbone of the benchmarks: traced, not fallen back
        assert fast.engine == "jit", fast.engine
    for user, n in ((fast.user_ids[0], 20), (fast.user_ids[7], 3), ("nobody", 11)):
        items = fast.item_ids[:n]
        hist = [(fast.item_ids[5], 4), (fast.item_ids[2], 1)]
        np.testing.assert_allclose(fast.score(user, items, history=hist).scores,
                                   slow.score(user, items, history=hist).scores, rtol=0, atol=1e-6)
    reqs = [fast.request(u, fast.item_ids[: 2 + j]) for j, u in enumerate(fast.user_ids[:5])]
    for a, b in zip(fast.score_requests(reqs), slow.score_requests(reqs)):
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-6)
