"""``cocorec score``: candidates from a file (one id a line, or Parquet), deduplicated, scored in batches; a run
trained with a relative dataset path scored from anywhere; a damaged checkpoint named in one line."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cocorec.cli import main
from cocorec.data import DataError
from cocorec.serve import load_scorer
from tests.conftest import write_generic


@pytest.fixture(scope="module")
def trained(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained from its own working directory with a relative dataset path (``toy``)."""
    base = tmp_path_factory.mktemp("score")
    write_generic(base / "toy", n_users=30, n_items=20, per_user=12, seed=11)
    cwd = os.getcwd()
    os.chdir(base)
    try:
        rc = main(["train", "--dataset", "toy", "--backbone", "deepfm", "--output", "runs/r", "--results", "",
                   "--epochs", "1", "--quiet", "--set", "train.batch_size=64", "--set", "train.threads=1"])
    finally:
        os.chdir(cwd)
    assert rc == 0
    return base


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "elsewhere"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def _score(capsys, run: Path, *args: str) -> list[tuple[str, float]]:
    assert main(["score", "--run", str(run), "--user", "u1", *args]) == 0
    return [(a, float(b)) for a, b in (line.split("\t") for line in capsys.readouterr().out.splitlines())]


def test_relative_dataset_run_scores_from_another_directory(trained, elsewhere, capsys):
    ck = json.loads((trained / "runs/r/checkpoint/config.json").read_text())
    assert ck["dataset"] == "toy" and ck["dataset_path"] == str(trained / "toy")
    out = _score(capsys, trained / "runs/r", "--items", "i1,i2,i3")
    assert sorted(i for i, _ in out) == ["i1", "i2", "i3"]
    assert [s for _, s in out] == sorted((s for _, s in out), reverse=True)


def test_old_run_without_recorded_path_is_found_above_its_directory(trained, tmp_path, elsewhere, capsys):
    run = trained / "runs" / "old"
    shutil.copytree(trained / "runs/r", run)
    cfg_path = run / "checkpoint" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["dataset_path"], cfg["data_dir"]              # as runs written before paths were recorded
    cfg_path.write_text(json.dumps(cfg))
    try:
        assert len(_score(capsys, run, "--items", "i1,i2")) == 2
        moved = tmp_path / "moved-toy"
        shutil.copytree(trained / "toy", moved)
        cfg["dataset"] = "nowhere/toy"
        cfg_path.write_text(json.dumps(cfg))
        assert main(["score", "--run", str(run), "--user", "u1", "--items", "i1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "the run's dataset 'nowhere/toy' was not found" in err[0] and "--dataset" in err[0]
        assert len(_score(capsys, run, "--items", "i1", "--dataset", str(moved))) == 1
    finally:
        shutil.rmtree(run)


def test_items_file_deduplicated_and_batched(trained, tmp_path, elsewhere, capsys):
    run = trained / "runs/r"
    f = tmp_path / "items.txt"
    f.write_text("i3\ni1\n\ni3\n i2 \ni1\n")
    one = _score(capsys, run, "--items-file", str(f))
    assert sorted(i for i, _ in one) == ["i1", "i2", "i3"]               # each id once
    assert [s for _, s in one] == sorted((s for _, s in one), reverse=True)

    def same(other):   # batch sizes change float rounding only
        assert len(other) == len(one) and dict(other) == pytest.approx(dict(one), abs=2e-4)

    same(_score(capsys, run, "--items-file", str(f), "--batch-size", "1"))
    same(_score(capsys, run, "--items", "i3,i1,i2,i1"))
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    pd.DataFrame({"item": ["i3", "i1", "i2", "i3"]}).to_parquet(tmp_path / "items.parquet")
    same(_score(capsys, run, "--items-file", str(tmp_path / "items.parquet"), "--batch-size", "2"))


def test_batched_scores_equal_one_batch(trained, elsewhere):
    scorer = load_scorer(trained / "runs/r")
    items = list(scorer.data.item_ids) * 3
    whole = scorer.score_user("u1", items)
    # the same numbers up to float rounding (matrix kernels sum in another order for another batch size)
    np.testing.assert_allclose(scorer.score_user("u1", items, batch_size=7), whole, rtol=0, atol=1e-6)
    assert whole.shape == (len(items),)
    with pytest.raises(DataError, match=r"unknown item id\(s\) \['x0', 'x1', 'x2', 'x3', 'x4'\] \(6 of 7\)"):
        scorer.score_user("u1", [f"x{i}" for i in range(6)] + ["i1"], batch_size=2)


def _damaged(trained: Path, tmp_path: Path, edit) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained / "runs/r", run)
    edit(run / "checkpoint")
    return run


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _edit_config(**changes):
    def edit(ck: Path) -> None:
        cfg = json.loads((ck / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                del cfg[k]
            else:
                cfg[k] = v
        (ck / "config.json").write_text(json.dumps(cfg))
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda ck: _truncate(ck / "model.safetensors", 100), r"model\.safetensors: not a readable safetensors file "
                                                          r"\(.*\); the checkpoint is damaged"),
    (lambda ck: _truncate(ck / "config.json", 40), r"config\.json: not valid JSON \(.* at line \d+\); the checkpoint "
                                                   r"is damaged"),
    (_edit_config(backbone="dcnv2"), r"config\.json does not match .*model\.safetensors \(.*\); was config\.json "
                                     r"edited\?"),
    (_edit_config(backbone="resnet"), r"config\.json: field 'backbone' is 'resnet', not a backbone"),
    (_edit_config(method=None), r"config\.json: missing field 'method'"),
    (_edit_config(model={"embedding_dim": 7}), r"config\.json does not match .*model\.safetensors"),
    (_edit_config(spec={"n_users": 3}), r"config\.json: field 'spec': "),
    (_edit_config(knowledge_dims="x"), r"config\.json: field 'knowledge_dims' should be a list"),
])
def test_damaged_checkpoint_is_one_line(trained, tmp_path, elsewhere, capsys, edit, message):
    run = _damaged(trained, tmp_path, edit)
    assert main(["score", "--run", str(run), "--user", "u1", "--items", "i1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
