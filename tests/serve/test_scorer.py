from __future__ import annotations

import numpy as np
import pytest

from cocorec.data import DataError
from cocorec.serve import load_scorer
from cocorec.train.run import RunConfig, run
from cocorec.train.trainer import TrainConfig


def test_scorer_reproduces_test_scores(ml100k, tmp_path):
    cfg = RunConfig(dataset="ml-100k", backbone="deepfm", seed=0, output=str(tmp_path / "r"), results=None,
                    quiet=True, train=TrainConfig(epochs=1, max_steps_per_epoch=10))
    m = run(cfg, data=ml100k)
    scorer = load_scorer(tmp_path / "r", data=ml100k)
    from cocorec.eval.metrics import auc
    s = ml100k.split("test")
    assert abs(auc(s.label, scorer.score_split("test")) - m["test"]["auc"]) < 1e-9
    scores = scorer.score_user(ml100k.user_ids[0], ml100k.item_ids[:5])
    assert scores.shape == (5,) and np.all((scores > 0) & (scores < 1))
    with pytest.raises(DataError, match="unknown item"):
        scorer.score_user(ml100k.user_ids[0], ["no-such-item"])


def test_missing_checkpoint(tmp_path):
    with pytest.raises(DataError, match="no trained checkpoint"):
        load_scorer(tmp_path)
