"""Runs are never lost: what a run does with an output directory that already holds a run, writability
checked before any work, and strict JSON (no NaN) in metrics.json and the results file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from cocorec.cli import main
from cocorec.config import RunError
from cocorec.train.run import RunConfig, append_result, execute, run
from cocorec.train.trainer import TrainConfig, Trainer
from cocorec.utils.io import nonfinite_to_none, strict_json_dumps
from tests.conftest import write_generic

TINY = TrainConfig(epochs=2, batch_size=64, max_steps_per_epoch=3, threads=1, patience=5)


@pytest.fixture(scope="module")
def toy(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from cocorec.data import prepare

    d = write_generic(tmp_path_factory.mktemp("run-toy") / "toy", n_users=30, n_items=20, per_user=12, seed=7)
    return prepare(str(d))


def _cfg(tmp_path: Path, **kw) -> RunConfig:
    base = dict(dataset="toy", backbone="deepfm", method="base", seed=0, output=str(tmp_path / "out"),
                results=str(tmp_path / "results.jsonl"), quiet=True, train=TINY)
    return RunConfig(**{**base, **kw})


def _strict(text: str):
    def bad(c):
        raise ValueError(f"not JSON: {c}")
    return json.loads(text, parse_constant=bad)


def _snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*"))
            if p.is_file()}


def test_identical_rerun_is_done_and_writes_nothing(toy, tmp_path):
    cfg = _cfg(tmp_path)
    first = execute(cfg, data=toy)
    assert first.status == "trained" and first.appended
    out, res = Path(cfg.output), Path(cfg.results)
    before, lines = _snapshot(out), res.read_bytes()
    again = execute(cfg, data=toy)
    assert again.status == "done" and not again.appended
    assert again.metrics["test"] == first.metrics["test"]
    assert _snapshot(out) == before            # metrics.json and checkpoint neither rewritten nor touched
    assert res.read_bytes() == lines and len(lines.splitlines()) == 1
    # every file written is strict JSON (no NaN / Infinity)
    _strict((out / "metrics.json").read_text())
    _strict((out / "checkpoint" / "config.json").read_text())
    _strict(res.read_text())


def test_a_lost_results_line_is_restored_once(toy, tmp_path):
    cfg = _cfg(tmp_path)
    execute(cfg, data=toy)
    line = Path(cfg.results).read_text()
    Path(cfg.results).unlink()                 # e.g. killed between metrics.json and the results line
    assert execute(cfg, data=toy).appended
    assert Path(cfg.results).read_text() == line
    assert not execute(cfg, data=toy).appended
    assert Path(cfg.results).read_text() == line


def test_another_configuration_is_refused_and_overwrite_replaces_it(toy, tmp_path):
    cfg = _cfg(tmp_path)
    execute(cfg, data=toy)
    out = Path(cfg.output)
    before = _snapshot(out)
    other = replace(cfg, train=replace(TINY, lr=0.002))
    with pytest.raises(RunError, match=r"holds a finished run of another configuration \(it differs in "
                                       r"train\.lr 0\.001 -> 0\.002\); use another --output, or pass --overwrite"):
        execute(other, data=toy)
    assert _snapshot(out) == before and len(Path(cfg.results).read_text().splitlines()) == 1
    res = execute(replace(other, overwrite=True), data=toy)
    assert res.status == "trained"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["config"]["run_key"] == other.key() != cfg.key()
    assert len(Path(cfg.results).read_text().splitlines()) == 2


def test_cli_refuses_another_configuration_in_one_line(toy, tmp_path, capsys):
    execute(_cfg(tmp_path), data=toy)
    rc = main(["train", "--dataset", "no-such-dataset", "--backbone", "deepfm", "--output", str(tmp_path / "out"),
               "--results", str(tmp_path / "results.jsonl"), "--seed", "3", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "holds a finished run of another configuration" in err[0] and "seed 0 -> 3" in err[0]


def test_unfinished_run_of_another_configuration_is_refused(toy, tmp_path):
    cfg = _cfg(tmp_path)
    last = Path(cfg.output) / "last"
    last.mkdir(parents=True)
    state = {"run_key": "someotherkey", "epoch": 1, "config": asdict(replace(TINY, lr=0.01))}
    (last / "state.json").write_text(json.dumps(state))
    with pytest.raises(RunError, match=r"holds an unfinished run \(stopped after epoch 1\) of another configuration "
                                       r"\(it differs in train\.lr 0\.01 -> 0\.001\)"):
        execute(cfg, data=toy)


def test_unreadable_metrics_json_is_named(toy, tmp_path):
    cfg = _cfg(tmp_path)
    execute(cfg, data=toy)
    m = Path(cfg.output) / "metrics.json"
    m.write_text(m.read_text()[:50])
    with pytest.raises(RunError, match=r"metrics\.json: unreadable .*pass --overwrite"):
        execute(cfg, data=toy)


def test_same_configuration_on_changed_data_is_refused(toy, tmp_path):
    from cocorec.data.protocol import CTRData

    cfg = _cfg(tmp_path)
    execute(cfg, data=toy)
    changed = CTRData(toy.name, toy.spec, toy.config, toy.arrays, toy.meta)
    changed.key = "0123456789abcdef"
    with pytest.raises(RunError, match=r"finished run of this configuration on other data"):
        execute(cfg, data=changed)


def test_interrupted_run_resumes_bit_identical(toy, tmp_path, monkeypatch):
    full = run(_cfg(tmp_path / "a"), data=toy)
    cfg = _cfg(tmp_path / "b")
    save_last = Trainer._save_last

    def killed(self):
        save_last(self)
        raise KeyboardInterrupt   # after the first epoch's state is on disk

    monkeypatch.setattr(Trainer, "_save_last", killed)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, data=toy)
    monkeypatch.setattr(Trainer, "_save_last", save_last)
    assert not (Path(cfg.output) / "metrics.json").exists() and (Path(cfg.output) / "last").is_dir()
    resumed = execute(cfg, data=toy)
    assert resumed.status == "trained"
    assert resumed.metrics["test"] == full["test"] and resumed.metrics["val"] == full["val"]
    def history(m):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in m["train"]["history"]]

    assert history(resumed.metrics) == history(full) and len(history(full)) == 2


def test_output_and_results_paths_checked_before_the_data(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    common = ["train", "--dataset", "no-such-dataset", "--quiet"]
    assert main([*common, "--output", str(tmp_path / "afile" / "run"), "--results", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "afile is a file, not a directory" in err[0]
    assert main([*common, "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"results file {tmp_path} is a directory" in err[0]


def _unprivileged() -> list[str] | None:
    """A command prefix under which file permissions hold (root ignores them), or None."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if not setpriv:
        return None
    caps = "-dac_override,-dac_read_search"
    probe = subprocess.run([setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", "true"], capture_output=True)
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"] if probe.returncode == 0 else None


@pytest.mark.parametrize("what", ["output", "results"])
def test_read_only_output_or_results_is_one_line_before_the_data(tmp_path, what):
    prefix = _unprivileged()
    if prefix is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    ro_file = tmp_path / "results.jsonl"
    ro_file.write_text("")
    ro_file.chmod(0o444)
    ro_dir.chmod(0o555)
    try:
        args = (["--output", str(ro_dir), "--results", ""] if what == "output"
                else ["--output", str(tmp_path / "out"), "--results", str(ro_file)])
        p = subprocess.run([*prefix, sys.executable, "-m", "cocorec.cli", "train", "--dataset", "no-such-dataset",
                            "--quiet", *args], capture_output=True, text=True, timeout=120)
    finally:
        ro_dir.chmod(0o755)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr
    if what == "output":
        assert err[0].startswith(f"error: output directory {ro_dir} is not writable") and "Permission denied" in err[0]
    else:
        assert err[0].startswith(f"error: results file {ro_file} is not writable (Permission denied)")
    assert not (tmp_path / "out").exists()


def _one_class(data, split: str):
    from cocorec.data.protocol import CTRData

    arrays = dict(data.arrays)
    arrays[f"{split}/label"] = np.ones_like(arrays[f"{split}/label"])
    d = CTRData(data.name, data.spec, data.config, arrays, data.meta)
    d.key = data.key
    return d


def test_one_class_split_is_an_error_before_training_and_nothing_is_written(toy, tmp_path):
    data = _one_class(toy, "test")
    n = data.split("test").n
    with pytest.raises(RunError, match=rf"the test split's {n} samples are all positive: AUC is undefined"):
        run(_cfg(tmp_path), data=data)
    assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "out" / "metrics.json").exists()


def test_trainer_stops_at_a_nan_validation_metric(toy):
    from cocorec.knowledge.base import build_method
    from cocorec.models import build_model

    data = _one_class(toy, "val")
    t = Trainer(build_model("deepfm", data.spec), build_method("base"), data, TINY, quiet=True)
    with pytest.raises(RunError, match=r"metric val \(epoch 1\)\.auc is nan \(the split's \d+ samples are all "
                                       r"positive: one class\)"):
        t.fit()


def test_nan_is_never_written(tmp_path):
    p = tmp_path / "r.jsonl"
    with pytest.raises(ValueError, match=r"metrics\.test\.auc is nan, which is not valid JSON"):
        append_result(p, {"run_key": "k", "metrics": {"test": {"auc": float("nan")}}})
    assert not p.exists() or p.read_text() == ""
    with pytest.raises(ValueError, match=r"history\[1\]\.loss is inf"):
        strict_json_dumps({"history": [{"loss": 1.0}, {"loss": float("inf")}]})
    # undefined values where they are legitimate (a one-class group's AUC) are written as null
    assert nonfinite_to_none({"g": {"auc": float("nan"), "n": 3}, "v": [np.float32("nan"), 1.0]}) == {
        "g": {"auc": None, "n": 3}, "v": [None, 1.0]}
