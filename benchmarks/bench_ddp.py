"""torchrun with 2 processes vs 1 process, same global batch: test metrics side by side and wall time.

Each (method, seed) is trained twice from scratch with the same settings: ``python -m cocorec train``
(1 process, ``--threads`` torch threads) and ``torchrun --standalone --nproc_per_node=2 -m cocorec
train`` (2 processes, 1 torch thread each, ``train.batch_size`` still the global batch). Outputs go
to a temporary directory (``--keep DIR`` keeps them). With ``--deterministic`` it instead times one
process with ``train.deterministic`` on and off (the same seed: the metrics must be identical).

    python benchmarks/bench_ddp.py --methods base,kar --seeds 0,1,2
    python benchmarks/bench_ddp.py --deterministic --seeds 0
    python benchmarks/bench_ddp.py --methods coco --seeds 0 --max-steps-per-epoch 8 --set train.epochs=1

The kar rows need the KAR knowledge cached (``cocorec knowledge generate --dataset ml-100k --method kar``).
``--max-steps-per-epoch K``: a few steps per epoch, to time a step (CoCo: its time per step leaves
out the bank refills, reported beside it) rather than to compare metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def step_seconds(m: dict) -> tuple[float, float]:
    """(seconds per training step without CoCo's bank refills, seconds of those refills) of a run (rank 0's)."""
    refill = float(m.get("diagnostics", {}).get("timing", {}).get("bank_refresh_s", 0.0))
    return (m["train"]["train_seconds"] - refill) / max(m["train"]["steps"], 1), refill


def train(out: Path, argv: list[str], processes: int, threads: int) -> tuple[dict, float]:
    """Run one training, return (metrics.json, wall seconds of the whole command)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    launcher = [sys.executable, "-m", "cocorec"] if processes == 1 else [*torchrun, "-m", "cocorec"]
    cmd = [*launcher, "train", *argv, "--output", str(out), "--results", str(out.parent / "results.jsonl"),
           "--quiet", "--set", f"train.threads={threads}"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text()), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--backbone", default="din")
    ap.add_argument("--methods", default="base")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the 1-process run")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for every run")
    ap.add_argument("--max-steps-per-epoch", type=int, default=None, help="train.max_steps_per_epoch (timing)")
    ap.add_argument("--deterministic", action="store_true", help="time train.deterministic on vs off instead")
    ap.add_argument("--keep", default=None, help="keep the runs in this directory")
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-ddp-"))
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows = []
    for method in args.methods.split(","):
        for seed in seeds:
            argv = ["--dataset", args.dataset, "--backbone", args.backbone, "--method", method, "--seed", str(seed)]
            argv += [a for kv in args.overrides for a in ("--set", kv)]
            if args.max_steps_per_epoch:
                argv += ["--set", f"train.max_steps_per_epoch={args.max_steps_per_epoch}"]
            tag = f"{args.backbone}-{method}-{seed}"
            if args.deterministic:
                runs = {"on": None, "off": None}
                for mode in (("on", "off") if seed % 2 == 0 else ("off", "on")):   # alternate: the load drifts
                    runs[mode] = train(root / f"{tag}-det-{mode}",
                                       argv + ["--set", f"train.deterministic={mode == 'on'}"], 1, args.threads)
                (a, wa), (b, wb) = runs["on"], runs["off"]
                same = a["test"] == b["test"] and a["val"] == b["val"]
                rows.append((method, seed, a["test"]["auc"], b["test"]["auc"], a["train"]["train_seconds"],
                             b["train"]["train_seconds"], wa, wb, same))
                print(f"{tag}: deterministic on AUC {a['test']['auc']:.4f} train {a['train']['train_seconds']:.1f} s"
                      f" | off AUC {b['test']['auc']:.4f} train {b['train']['train_seconds']:.1f} s | identical {same}",
                      flush=True)
                continue
            one, w1 = train(root / f"{tag}-1p", argv, 1, args.threads)
            two, w2 = train(root / f"{tag}-2p", argv, 2, 1)
            rows.append((method, seed, one, two, w1, w2))
            (s1, r1), (s2, r2) = step_seconds(one), step_seconds(two)
            print(f"{tag}: 1 process AUC {one['test']['auc']:.4f} ({w1:.0f} s, {s1:.2f} s/step, refills {r1:.0f} s)"
                  f" | 2 processes AUC {two['test']['auc']:.4f} ({w2:.0f} s, {s2:.2f} s/step, refills {r2:.0f} s)"
                  f" | step time 2/1: {s2 / s1:.2f}", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    if args.deterministic:
        print("\n| method | seed | test AUC on | test AUC off | train s on | train s off | identical |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for m, s, aa, ab, ta, tb, _, _, same in rows:
            print(f"| {m} | {s} | {aa:.4f} | {ab:.4f} | {ta:.1f} | {tb:.1f} | {same} |")
        return
    print(f"\n| method | seed | test AUC 1 proc | test AUC 2 procs | diff | test GAUC 1 / 2 | epochs 1 / 2 "
          f"| wall 1 proc ({args.threads} threads) | wall 2 procs (1 thread each) |")
    print("|---|---:|---:|---:|---:|---|---|---:|---:|")
    for m, s, one, two, w1, w2 in rows:
        d = two["test"]["auc"] - one["test"]["auc"]
        print(f"| {m} | {s} | {one['test']['auc']:.4f} | {two['test']['auc']:.4f} | {d:+.4f} "
              f"| {one['test']['gauc']:.4f} / {two['test']['gauc']:.4f} "
              f"| {one['train']['epochs_run']} / {two['train']['epochs_run']} | {w1:.0f} s | {w2:.0f} s |")
    for m in dict.fromkeys(r[0] for r in rows):
        sel = [r for r in rows if r[0] == m]
        diffs = [r[3]["test"]["auc"] - r[2]["test"]["auc"] for r in sel]
        print(f"{m}: mean test AUC 1 proc {statistics.mean(r[2]['test']['auc'] for r in sel):.4f}, 2 procs "
              f"{statistics.mean(r[3]['test']['auc'] for r in sel):.4f}; mean |diff| "
              f"{statistics.mean(abs(d) for d in diffs):.4f}, max |diff| {max(abs(d) for d in diffs):.4f}; "
              f"wall {statistics.mean(r[4] for r in sel):.0f} s vs {statistics.mean(r[5] for r in sel):.0f} s")
    print(f"runs in {root}")


if __name__ == "__main__":
    main()
