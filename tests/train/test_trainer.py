"""Trainer: determinism, early stopping on validation, checkpoints, resume, and an end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cocorec.cli import main
from cocorec.config import ConfigError
from cocorec.knowledge.base import build_method
from cocorec.models import build_model
from cocorec.train.run import RunConfig, run
from cocorec.train.trainer import TrainConfig, Trainer, resolve_device

FAST = TrainConfig(epochs=2, batch_size=512, max_steps_per_epoch=15, threads=2)


def _trainer(data, out=None, seed=0, epochs=2, backbone="deepfm", **train):
    torch.manual_seed(seed)
    model = build_model(backbone, data.spec)
    cfg = TrainConfig(**{**FAST.__dict__, "epochs": epochs, **train})
    return Trainer(model, build_method("base"), data, cfg, output_dir=out, quiet=True, run_key="k", seed=seed)


def test_fixed_seed_gives_identical_metrics(ml100k):
    a = _trainer(ml100k, seed=3)
    a.fit()
    b = _trainer(ml100k, seed=3)
    b.fit()
    np.testing.assert_array_equal(a.predict("test")["prob"], b.predict("test")["prob"])


def test_deterministic_on_by_default_keeps_the_run_keys_recorded_before_it():
    from dataclasses import replace

    cfg = RunConfig(dataset="ml-100k", backbone="din", seed=0,
                    train=TrainConfig(epochs=2, max_steps_per_epoch=20, threads=1))
    assert cfg.train.deterministic and cfg.key() == "9062eb6772dccd34"   # its key before the setting existed
    assert replace(cfg, train=replace(cfg.train, deterministic=False)).key() != cfg.key()
    assert RunConfig().with_overrides({"train": {"deterministic": "false"}}).train.deterministic is False


def test_deterministic_kernels_change_nothing_on_the_cpu(ml100k):
    quick = dict(seed=2, epochs=1, max_steps_per_epoch=5, threads=1)
    on = _trainer(ml100k, deterministic=True, **quick)
    assert torch.are_deterministic_algorithms_enabled()
    on.fit()
    off = _trainer(ml100k, deterministic=False, **quick)
    assert not torch.are_deterministic_algorithms_enabled()
    off.fit()
    np.testing.assert_array_equal(on.predict("test")["prob"], off.predict("test")["prob"])


def test_embedding_l2_shrinks_the_embedding_tables(ml100k):
    def norm_after(l2: float) -> float:
        torch.manual_seed(0)
        model = build_model("deepfm", ml100k.spec)
        cfg = TrainConfig(**{**FAST.__dict__, "epochs": 1, "embedding_l2": l2})
        Trainer(model, build_method("base"), ml100k, cfg, quiet=True, seed=0).fit()
        return float(sum(p.pow(2).sum() for p in model.embedding_parameters()))

    assert norm_after(1e-3) < 0.9 * norm_after(0.0)


def test_resume_matches_uninterrupted(ml100k, tmp_path):
    full = _trainer(ml100k, tmp_path / "full", epochs=3)
    full.fit()
    part = _trainer(ml100k, tmp_path / "part", epochs=1)  # "killed" after one epoch
    part.fit()
    resumed = _trainer(ml100k, tmp_path / "part", epochs=3)
    resumed.fit()
    assert resumed.epoch == 3 and len(resumed.history) == 3
    np.testing.assert_allclose(resumed.predict("test")["prob"], full.predict("test")["prob"], rtol=0, atol=1e-6)


def test_best_checkpoint_is_safetensors_and_reloads(ml100k, tmp_path):
    t = _trainer(ml100k, tmp_path / "r")
    t.fit()
    ck = tmp_path / "r" / "checkpoint"
    assert (ck / "model.safetensors").is_file() and (ck / "trainer.json").is_file()
    fresh = _trainer(ml100k)
    fresh.load_checkpoint(ck)
    np.testing.assert_array_equal(fresh.predict("val")["prob"], t.predict("val")["prob"])
    # the restored model is the best epoch on validation, never chosen on test
    best = max(h["val_auc"] for h in t.history)
    assert abs(t.evaluate("val")["auc"] - best) < 1e-9


def test_run_writes_metrics_and_appends_results(ml100k, tmp_path):
    cfg = RunConfig(dataset="ml-100k", backbone="din", seed=1, output=str(tmp_path / "o"),
                    results=str(tmp_path / "results.jsonl"), quiet=True, train=FAST)
    m = run(cfg, data=ml100k)
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    for split in ("val", "test"):
        assert {"auc", "logloss", "gauc"} <= set(saved[split])
    assert "gender x age_group" in saved["groups"]["test"]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    assert rec["backbone"] == "din" and rec["method"] == "base" and rec["seed"] == 1 and rec["git_sha"]
    assert rec["metrics"]["test"]["auc"] == m["test"]["auc"]
    assert rec["machine"]["device"] == str(resolve_device(cfg.train.device))   # where it ran (auto: cuda if any)
    assert rec["machine"]["cpu_count"] >= 1
    if rec["machine"]["device"] == "cpu":   # which CPU, and whether lm_dtype=auto meant bf16 on it
        assert rec["machine"]["cpu_model"] and isinstance(rec["machine"]["native_bf16"], bool)
    assert json.loads((tmp_path / "o" / "checkpoint" / "config.json").read_text())["backbone"] == "din"


def test_overrides_reject_unknown_keys_and_wrong_types():
    cfg = RunConfig(backbone="din")
    with pytest.raises(ConfigError, match="unknown key 'lrate'"):
        cfg.with_overrides({"train": {"lrate": "1"}})
    with pytest.raises(ConfigError, match="expected a number"):
        cfg.with_overrides({"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="unknown key 'hidden'"):
        cfg.with_overrides({"model": {"hidden": "3"}})
    ok = cfg.with_overrides({"train": {"lr": "0.01"}, "model": {"embedding_dim": "8"}})
    assert ok.train.lr == 0.01 and ok.model == {"embedding_dim": 8}
    assert ok.key() != cfg.key()


@pytest.mark.slow
def test_end_to_end_cli_auc_well_above_chance(ml100k, tmp_path, capsys):
    out = tmp_path / "e2e"
    rc = main(["train", "--dataset", "ml-100k", "--backbone", "din", "--method", "base", "--seed", "0",
               "--output", str(out), "--results", str(tmp_path / "res.jsonl"), "--epochs", "2", "--quiet",
               "--set", "train.threads=2"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["auc"] > 0.70 and m["val"]["auc"] > 0.70
    assert "test" in capsys.readouterr().out


def test_resume_refuses_a_state_written_on_other_data(ml100k, tmp_path):
    from cocorec.config import RunError

    _trainer(ml100k, out=tmp_path, epochs=1).fit()
    state = tmp_path / "last" / "state.json"
    meta = json.loads(state.read_text())
    assert meta["data_key"] == ml100k.key
    meta["data_key"] = "0123456789abcdef"          # e.g. the spec's negatives ratio was edited since
    state.write_text(json.dumps(meta))
    with pytest.raises(RunError, match="written on other data"):
        _trainer(ml100k, out=tmp_path, epochs=2).fit()


def test_prediction_over_several_batches_shows_a_bar_unless_quiet(ml100k, capsys):
    torch.manual_seed(0)
    model = build_model("din", ml100k.spec, knowledge_dims=[])
    cfg = TrainConfig(epochs=1, batch_size=256, eval_batch_size=2048, threads=1)
    n = ml100k.split("val").n
    Trainer(model, build_method("base"), ml100k, cfg, quiet=False).predict("val")
    assert "predict val:" in capsys.readouterr().err and n > 2048
    quiet = Trainer(model, build_method("base"), ml100k, cfg, quiet=True)
    quiet.predict("val")
    assert capsys.readouterr().err == ""
    assert quiet.method.progress is False   # a quiet run's knowledge steps (LM passes) are silent too
