"""``cocorec export``: a bundle of every method scores the test split as the run's own evaluation does,
loads without the method or an LM, holds no pickle and nothing of the training samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cocorec.cli import main
from cocorec.data import DataError
from cocorec.eval.metrics import auc
from cocorec.serve import load_scorer
from cocorec.serve.bundle import FILES, BundleScorer, export_bundle
from cocorec.train.run import RunConfig, run
from cocorec.train.trainer import TrainConfig
from tests.conftest import write_generic
from tests.serve.test_score_every_method import ARGS as EVERY, TINY_LM

ARGS = {**EVERY, "kar-item": TINY_LM}

pytestmark = pytest.mark.filterwarnings("ignore:.*user texts exceed")


@pytest.fixture(scope="module")
def toy(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_generic(tmp_path_factory.mktemp("bundle-toy") / "toy", n_users=30, n_items=20, per_user=12,
                             seed=5))


def _train(toy: str, out: Path, method: str, seed: int = 0, **args) -> dict:
    cfg = RunConfig(dataset=toy, backbone="din", method=method, seed=seed, output=str(out), results=None, quiet=True,
                    train=TrainConfig(epochs=1, batch_size=64, threads=1), method_args={**ARGS[method], **args},
                    model={"hidden_units": (16,)})
    return run(cfg)


@pytest.mark.parametrize("method", sorted(ARGS))
def test_bundle_scores_equal_the_runs_own_evaluation(toy, tmp_path, method):
    metrics = _train(toy, tmp_path / "run", method)
    scorer = load_scorer(tmp_path / "run")
    manifest = export_bundle(tmp_path / "run", tmp_path / "bundle", scorer=scorer)
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == sorted(FILES)
    assert manifest["check"]["max_abs_diff"] <= 1e-6
    b = BundleScorer(tmp_path / "bundle")
    want = scorer.score_split("test")
    got = b.score_split(scorer.data, "test")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert auc(scorer.data.split("test").label, got) == pytest.approx(metrics["test"]["auc"], abs=1e-6)
    # one known user through the bundle's own history equals the run's score_user
    user, items = scorer.data.user_ids[0], scorer.data.item_ids[:5]
    np.testing.assert_allclose(b.score(user, items).scores, scorer.score_user(user, items), rtol=0, atol=1e-6)
    keys = {f["key"] for f in manifest["knowledge"]}
    want_keys = {"kar": {"user", "item"}, "r4ec": {"user", "item"}, "kar-item": {"item"}, "base": set()}
    assert keys == want_keys.get(method, {"user"})


def test_a_run_with_a_seeded_source_is_scored_with_its_own_draws(toy, tmp_path):
    """The corrupted users (and a swap's derangement) are drawn from the run's seed: the scorer and the
    export rebuild the source with that seed, not 0, or CoCo would read other users' texts."""
    from cocorec.knowledge.sources import UserSource

    metrics = _train(toy, tmp_path / "run", "coco", seed=3, source="oracle", corrupt=0.5, corruption="swap")
    scorer = load_scorer(tmp_path / "run")
    src = scorer.method.user_source(scorer.data)
    want = UserSource(scorer.data, "oracle", 0.5, seed=3, corruption="swap")
    assert src.corrupted.tolist() == want.corrupted.tolist()
    assert src.knowledge_user.tolist() == want.knowledge_user.tolist()
    got = auc(scorer.data.split("test").label, scorer.score_split("test"))
    assert got == pytest.approx(metrics["test"]["auc"], abs=1e-6)


@pytest.fixture(scope="module")
def coco_bundle(toy, tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("coco-bundle")
    _train(toy, base / "run", "coco")
    rc = main(["export", "--run", str(base / "run"), "--to", str(base / "bundle")])
    assert rc == 0
    return base / "run", base / "bundle"


def test_bundle_holds_no_pickle_and_no_training_samples(coco_bundle):
    from safetensors import safe_open

    _, bundle = coco_bundle
    for f in bundle.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f   # no pickle protocol header
    with safe_open(str(bundle / "tables.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == {"user_feats", "user_hist_items", "user_hist_ratings", "item_feats", "item_tags", "knowledge/0"}
    cfg = json.loads((bundle / "bundle.json").read_text())
    assert cfg["knowledge"] == [{"key": "user", "name": "user", "dim": 8}] and cfg["method"] == "coco"


def test_bundle_loads_without_an_lm(coco_bundle, monkeypatch):
    import cocorec.knowledge.lm as lm

    def no_lm(*a, **k):
        raise AssertionError("the bundle loaded an LM")

    monkeypatch.setattr(lm, "load_lm", no_lm)
    b = BundleScorer(coco_bundle[1])
    out = b.score(b.user_ids[0], b.item_ids[:3] + ["no-such-item"])
    assert out.user_known and out.unknown_items == ["no-such-item"] and out.scores[3] is None
    assert all(0 < s < 1 for s in out.scores[:3])


def test_unknown_user_fallback_is_zero_knowledge(coco_bundle):
    b = BundleScorer(coco_bundle[1])
    items = b.item_ids[:4]
    anon = b.score(None, items)
    assert not anon.user_known and all(0 < s < 1 for s in anon.scores)
    # the fallback = the backbone with the knowledge field zeroed, on the given profile and history
    hist = [(b.item_ids[5], 5), (b.item_ids[6], 1)]
    prof = {"gender": "F", "age": "30"}
    got = b.score("new-user", items, history=hist, profile=prof).scores
    row = b.user_row("new-user", hist, prof)
    assert row[0] == -1 and int(row[1].sum()) > 0 and row[2].tolist()[-2:] == [6, 7]
    batch = b.user_batch(row, torch_items(b, items))
    import torch
    with torch.no_grad():
        want = torch.sigmoid(b.model(batch, None)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


def torch_items(b: BundleScorer, items: list[str]):
    import torch

    return torch.tensor([b.item_index[i] for i in items])


def test_export_refuses_to_overwrite_and_bad_bundles_are_one_line(coco_bundle, tmp_path, capsys):
    run_dir, bundle = coco_bundle
    assert main(["export", "--run", str(run_dir), "--to", str(bundle)]) == 2
    assert "exists" in capsys.readouterr().err
    with pytest.raises(DataError, match="not a bundle"):
        BundleScorer(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in FILES:
        (bad / f).write_bytes((bundle / f).read_bytes())
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="model.safetensors"):
        BundleScorer(bad)
