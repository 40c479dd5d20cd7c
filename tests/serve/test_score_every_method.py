"""``score`` on a trained run of every method: the scorer rebuilds backbone and method from the
checkpoint alone (the method built on the backbone, its state restored, then prepared for the data)
and gives the run's own test scores back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cocorec.eval.metrics import auc
from cocorec.knowledge.base import METHODS, import_methods
from cocorec.serve import load_scorer
from tests.conftest import write_generic
from cocorec.train.run import RunConfig, run
from cocorec.train.trainer import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore:.*user texts exceed")

TINY_LM = dict(lm="tiny", encoder="tiny", max_new_tokens=4, batch_size=8, item_batch_size=8)
TINY_COCO = dict(lm="tiny", codebook_size=4, max_text_tokens=48, lm_users_per_step=6, contradiction_users_per_step=3,
                 lm_batch_users=16, readout_dim=16, readout_hidden=32, knowledge_dim=8, guard_min_samples=1)
ARGS = {"base": {}, "field": {}, "kar": TINY_LM, "r4ec": TINY_LM, "coco": TINY_COCO, "coco-novq": TINY_COCO,
        "coco-nojudge": TINY_COCO, "coco-oneprompt": TINY_COCO, "static": TINY_COCO}


@pytest.fixture(scope="module")
def toy(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_generic(tmp_path_factory.mktemp("score-toy") / "toy", n_users=30, n_items=20, per_user=12,
                             seed=5))


@pytest.mark.parametrize("method", sorted(ARGS))
def test_score_reproduces_the_runs_test_scores(toy, tmp_path, method):
    out = tmp_path / method
    cfg = RunConfig(dataset=toy, backbone="din", method=method, seed=0, output=str(out), results=None, quiet=True,
                    train=TrainConfig(epochs=1, batch_size=64, threads=1), method_args=ARGS[method],
                    model={"hidden_units": (16,)})
    metrics = run(cfg)
    scorer = load_scorer(out)
    s = scorer.data.split("test")
    assert auc(s.label, scorer.score_split("test")) == pytest.approx(metrics["test"]["auc"], abs=1e-6)
    scores = scorer.score_user(scorer.data.user_ids[0], scorer.data.item_ids[:5])
    assert scores.shape == (5,) and np.all((scores > 0) & (scores < 1))


def test_the_table_of_builtin_methods_is_what_the_modules_define():
    from cocorec.knowledge.base import BUILTIN_METHODS

    import_methods()
    for name, module in BUILTIN_METHODS.items():
        assert METHODS[name].__module__ == module, name
    assert set(ARGS) | {"kar-item"} == set(BUILTIN_METHODS)
