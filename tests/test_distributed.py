"""Training with torchrun (DDP, gloo on the CPU): the sharded sampler, 2 processes against 1 with the
same global batch, rank 0 alone writing, a distributed run resumed after a kill, and CoCo under DDP
(every rank's weights, LoRA, bank and codebook equal; against 1 process; resumed after a kill)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cocorec.cli import main
from cocorec.train import distributed
from cocorec.train.distributed import DistributedError, shard, train_batches
from cocorec.train.run import RunConfig, validate
from tests.conftest import write_generic

# deepfm without dropout computes each sample's loss from that sample alone: 2 processes then train
# what 1 trains up to float rounding. batch 63 splits 31/32 (the loss weights) and leaves a short
# last batch per epoch.
EXACT = ["--backbone", "deepfm", "--set", "model.dropout=0.0"]
# din with Dice (batch statistics) and dropout: its run differs from 1 process, but resuming it
# must need every rank's RNG state and rank 0's buffers.
DIN = ["--backbone", "din"]
# CoCo, 2 processes vs 1 (see the test): per-step contradiction rate, per-epoch training BCE
TOL_RATE, TOL_LOSS = 0.05, 0.01
COMMON = ["--method", "base", "--seed", "3", "--epochs", "2", "--quiet", "--set", "train.batch_size=63",
          "--set", "train.threads=1", "--set", "train.patience=5"]


@pytest.fixture(scope="module")
def toy_dir(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_generic(tmp_path_factory.mktemp("ddp") / "toy", n_users=30, n_items=20, per_user=12, seed=5)


def _argv(toy_dir: Path, out: Path, model: list[str]) -> list[str]:
    return ["train", "--dataset", str(toy_dir), *COMMON, *model, "--output", str(out / "run"),
            "--results", str(out / "results.jsonl")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state_hashes(trainer) -> dict[str, str]:
    """A hash of every tensor of the trainer's state (model, CoCo's parameters, LoRA, judge and
    scheduler state, reset queries) and of CoCo's bank, but not the per-rank generators."""
    tensors = dict(trainer._tensors())
    if hasattr(trainer.method, "bank"):
        tensors["bank/table"] = trainer.method.bank.table
    return {k: hashlib.sha256(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
            for k, v in tensors.items() if "rng/" not in k}


def _worker(rank: int, world: int, port: int, argv: list[str], kill_after_epoch: int | None, dump: bool) -> None:
    """One torchrun process, spawned by the test (what torchrun sets, then the CLI). ``dump``: after
    each epoch and after the fit (the guard decided) every rank writes its state hashes beside the run
    (``state-R-E.json``, ``state-R-fit.json``)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from cocorec.train.trainer import Trainer

    save_last, fit = Trainer._save_last, Trainer.fit

    def write(self, tag):
        if dump:
            (self.output_dir.parent / f"state-{rank}-{tag}.json").write_text(json.dumps(_state_hashes(self)))

    def save(self):
        save_last(self)
        write(self, self.epoch)
        distributed.barrier()          # rank 0 has written last/ before any rank dies
        if self.epoch == kill_after_epoch:
            raise KeyboardInterrupt

    def fitted(self):
        out = fit(self)
        write(self, "fit")
        return out

    Trainer._save_last, Trainer.fit = save, fitted
    rc = main(argv)
    if rc and kill_after_epoch is None:   # a killed run returns 130
        raise SystemExit(rc)


def _spawn(argv: list[str], kill_after_epoch: int | None = None, world: int = 2, dump: bool = False) -> None:
    mp.spawn(_worker, args=(world, _free_port(), argv, kill_after_epoch, dump), nprocs=world, join=True)


def _metrics(out: Path) -> dict:
    return json.loads((out / "run" / "metrics.json").read_text())


def _history(m: dict) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in m["train"]["history"]]


# ----------------------------------------------------------------------------- sampler (no processes)
@pytest.mark.parametrize("n,world", [(10, 4), (7, 2), (3, 3), (2, 4), (1000, 3)])
def test_shards_cover_every_row_exactly_once(n, world):
    parts = [shard(n, r, world) for r in range(world)]
    rows = np.concatenate([np.arange(lo, hi) for lo, hi in parts])
    assert rows.tolist() == list(range(n))
    assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1


def test_one_process_sampler_is_the_data_order(toy_dir):
    from cocorec.data import prepare

    data = prepare(str(toy_dir))
    ours = list(train_batches(data, "train", 63, seed=3, epoch=1))
    theirs = list(data.batches("train", 63, shuffle=True, seed=3, epoch=1))
    assert len(ours) == len(theirs) > 2 and data.split("train").n % 63   # a short last batch
    for (b, weight, rows), ref in zip(ours, theirs):
        assert weight == 1.0 and rows == len(ref["label"])
        assert all(torch.equal(b[k], ref[k]) for k in ref)


def test_a_method_with_per_process_state_is_refused_under_torchrun_before_any_work(monkeypatch, capsys):
    from cocorec.knowledge.base import METHODS

    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("coco", "coco-nojudge", "kar"):   # CoCo synchronises its state; KAR's vectors are buffers
        validate(RunConfig(dataset="no-such-dataset", method=name))
    monkeypatch.setattr(METHODS["kar"], "supports_distributed", False, raising=False)
    with pytest.raises(DistributedError, match="method kar cannot train in several processes"):
        validate(RunConfig(dataset="no-such-dataset", method="kar"))
    assert main(["train", "--dataset", "no-such-dataset", "--method", "kar", "--quiet", "--results", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot train in several processes" in err[0]


# ----------------------------------------------------------------------------- 2 processes
@pytest.mark.slow   # starts 2 processes per run
def test_torchrun_two_processes_match_one_with_the_same_global_batch(toy_dir, tmp_path):
    assert main(_argv(toy_dir, tmp_path / "one", EXACT)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "cocorec", *_argv(toy_dir, tmp_path / "two", EXACT)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("wrote ") == 1           # rank 0 alone reports
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    for split in ("val", "test"):
        assert two[split]["n"] == one[split]["n"]     # gathered: the whole split, no padding, no row twice
        for k in ("auc", "gauc", "logloss"):
            assert two[split][k] == pytest.approx(one[split][k], abs=1e-6), (split, k)
    for a, b in zip(_history(one), _history(two), strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    lines = (tmp_path / "two" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["machine"]["processes"] == 2
    assert two["config"]["run_key"] == one["config"]["run_key"]
    assert "processes" not in one["train"]["machine"]


@pytest.mark.slow   # starts 2 processes per run
def test_distributed_run_resumed_after_a_kill_matches_an_uninterrupted_one(toy_dir, tmp_path):
    _spawn(_argv(toy_dir, tmp_path / "full", DIN))
    full = _metrics(tmp_path / "full")
    killed = tmp_path / "killed"
    _spawn(_argv(toy_dir, killed, DIN), kill_after_epoch=1)
    assert not (killed / "run" / "metrics.json").exists() and (killed / "run" / "last" / "state.json").is_file()
    assert not (killed / "results.jsonl").exists()
    _spawn(_argv(toy_dir, killed, DIN))
    resumed = _metrics(killed)
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert _history(resumed) == _history(full) and len(_history(full)) == 2
    assert len((killed / "results.jsonl").read_text().splitlines()) == 1


# ----------------------------------------------------------------------------- CoCo, 2 processes
# CoCo on the tiny random LM with a contradiction phase from the second step (every step's rate is
# above -1; delta 0 makes it differ per rank), code resets every 2 steps (more codes than users: some
# are dead) and the shared on-disk base text cache. 2 epochs of 3 steps of 63 samples.
COCO_KEYS = {"lm": "tiny", "codebook_size": 32, "max_text_tokens": 48, "lm_users_per_step": 6,
             "contradiction_users_per_step": 4, "lm_batch_users": 16, "readout_dim": 16, "readout_hidden": 32,
             "knowledge_dim": 8, "guard_min_samples": 1, "kv_storage": "disk", "delta": 0.0, "rate_threshold": -1.0,
             "rate_window": 1, "warmup_steps": 1, "phase_steps": 2, "cooldown_steps": 100, "reset_every": 2}
COCO = ["--backbone", "din", "--method", "coco",
        *[a for k, v in COCO_KEYS.items() for a in ("--set", f"method.{k}={v}")]]


@pytest.fixture(scope="module")
def coco_two(toy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-process CoCo run, every rank's state hashes written after each epoch."""
    out = tmp_path_factory.mktemp("coco-two")
    _spawn(_argv(toy_dir, out, COCO), dump=True)
    return out


@pytest.mark.slow   # starts 2 processes
@pytest.mark.filterwarnings("ignore:.*user texts exceed")
def test_coco_under_torchrun_keeps_every_rank_equal_and_rank_0_writes(coco_two, toy_dir):
    """After every epoch both ranks hold the same backbone, CoCo parameters (query, codebook keys and
    prompts, read-out), LoRA, bank, judge sums, scheduler history and reset queries; after the fit the
    same guard switches."""
    from cocorec.data import prepare

    for epoch in (1, 2, "fit"):
        a, b = (json.loads((coco_two / f"state-{r}-{epoch}.json").read_text()) for r in (0, 1))
        assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == [], epoch
        for part in ("method/codebook.keys", "method/judge/user_counts", "method/judge/state", "bank/table",
                     "method/codebook/recent"):
            assert part in a, part
        assert any(k.startswith("method/lora/") for k in a) and any(k.startswith("method/readout") for k in a)
    m = _metrics(coco_two)
    con = m["diagnostics"]["contradiction"]
    assert con["n_phases"] == 1 and con["n_lora_updates"] > 0 and 0 < con["rate_steps"][0] < 1
    assert m["diagnostics"]["codebook"]["dead_code_resets"] > 0
    assert m["diagnostics"]["kv_cache"]["shared_base_dir"] and m["diagnostics"]["guard"]["groups"]
    data = prepare(str(toy_dir))
    for split in ("val", "test"):     # the AUC is over every rank's predictions: the whole split
        assert m[split]["n"] == data.split(split).n
    assert len((coco_two / "results.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow   # starts 2 processes
@pytest.mark.filterwarnings("ignore:.*user texts exceed")
def test_coco_two_processes_near_one_with_the_same_global_batch(coco_two, toy_dir, tmp_path):
    """Not exact: each rank draws its own live users (its share of ``lm_users_per_step``) and dropout
    from its slice, so other users' bank rows are fresh, and DIN's Dice sees its slice's statistics.
    The rate the scheduler sees is the global batch's: the phase starts and ends on the same steps.
    The AUCs are not compared: 18 val/test samples, where one swapped pair moves the AUC by ~0.012."""
    assert main(_argv(toy_dir, tmp_path / "one", COCO)) == 0
    one, two = _metrics(tmp_path / "one"), _metrics(coco_two)
    c1, c2 = one["diagnostics"]["contradiction"], two["diagnostics"]["contradiction"]
    assert c2["phases"] == c1["phases"] and len(c2["rate_steps"]) == len(c1["rate_steps"]) == 6
    assert c2["rate_steps"] == pytest.approx(c1["rate_steps"], abs=TOL_RATE)
    for a, b in zip(_history(one), _history(two), strict=True):
        assert b["train_bce"] == pytest.approx(a["train_bce"], abs=TOL_LOSS)
        assert b["val_logloss"] == pytest.approx(a["val_logloss"], abs=TOL_LOSS / 2)
    for split in ("val", "test"):
        assert two[split]["n"] == one[split]["n"]
        assert two[split]["logloss"] == pytest.approx(one[split]["logloss"], abs=TOL_LOSS / 2), split


@pytest.mark.slow   # starts 2 processes per run
@pytest.mark.filterwarnings("ignore:.*user texts exceed")
def test_coco_under_torchrun_resumed_after_a_kill_matches_an_uninterrupted_run(coco_two, toy_dir, tmp_path):
    """Killed after epoch 1 (its phase and code resets done), resumed: each rank's method generator,
    the bank, the judge sums and the reset queries come back, so epoch 2 trains what it trained."""
    _spawn(_argv(toy_dir, tmp_path, COCO), kill_after_epoch=1)
    assert not (tmp_path / "run" / "metrics.json").exists()
    _spawn(_argv(toy_dir, tmp_path, COCO), dump=True)
    resumed, full = _metrics(tmp_path), _metrics(coco_two)
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert _history(resumed) == _history(full) and len(_history(full)) == 2
    a, b = (json.loads((d / "state-0-2.json").read_text()) for d in (coco_two, tmp_path))
    assert [k for k in a if a[k] != b[k]] == []
