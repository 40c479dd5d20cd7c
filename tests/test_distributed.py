"""Training with torchrun (DDP, gloo on the CPU): the sharded sampler, 2 processes against 1 with the
same global batch, rank 0 alone writing, a distributed run resumed after a kill, and CoCo refused."""

from __future__ import annotations

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
COMMON = ["--method", "base", "--seed", "3", "--epochs", "2", "--quiet", "--set", "train.batch_size=63",
          "--set", "train.threads=1", "--set", "train.patience=5"]


@pytest.fixture(scope="module")
def toy_dir(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_generic(tmp_path_factory.mktemp("ddp") / "toy", n_users=30, n_items=20, per_user=12, seed=5)


def _argv(toy_dir: Path, out: Path, model: list[str]) -> list[str]:
    return ["train", "--dataset", str(toy_dir), *model, *COMMON, "--output", str(out / "run"),
            "--results", str(out / "results.jsonl")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, argv: list[str], kill_after_epoch: int | None) -> None:
    """One torchrun process, spawned by the test (what torchrun sets, then the CLI)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    if kill_after_epoch is not None:
        from cocorec.train.trainer import Trainer

        save_last = Trainer._save_last

        def killed(self):
            save_last(self)
            distributed.barrier()          # rank 0 has written last/ before any rank dies
            if self.epoch == kill_after_epoch:
                raise KeyboardInterrupt

        Trainer._save_last = killed
    main(argv)


def _spawn(argv: list[str], kill_after_epoch: int | None = None, world: int = 2) -> None:
    mp.spawn(_worker, args=(world, _free_port(), argv, kill_after_epoch), nprocs=world, join=True)


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


def test_coco_is_refused_under_torchrun_before_any_work(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="method coco cannot train in several processes"):
        validate(RunConfig(dataset="no-such-dataset", method="coco"))
    validate(RunConfig(dataset="no-such-dataset", method="kar"))    # KAR's vectors are buffers: it can
    assert main(["train", "--dataset", "no-such-dataset", "--method", "coco", "--quiet", "--results", ""]) == 2
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
