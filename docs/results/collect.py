"""Collect the runs of a grid from results files (by run key) into a folder and render its report.

    .venv/bin/python docs/results/collect.py GRID OUT_DIR RESULTS [RESULTS ...]
    .venv/bin/python docs/results/collect.py grids/full.yaml docs/results/full \
        docs/results/ml100k-din-dcnv2.jsonl runs/bench/full/results.jsonl
    .venv/bin/python docs/results/collect.py grids/ml100k-kar-fields.yaml docs/results/kar-fields \
        runs/bench/full/results.jsonl

Keeps only lines whose run key is one of the grid's (the key is a hash of the whole run
configuration, so a kept line is a run of exactly the grid's configuration, wherever it ran). When
a run appears more than once the later line wins: ``OUT_DIR/results.jsonl`` (what was collected
before) first, then the files in the order given. Writes ``OUT_DIR/results.jsonl``,
``OUT_DIR/REPORT.md`` and ``OUT_DIR/plots/``; runs of the grid without a line are listed as missing.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cocorec.bench.grid import expand_grid, load_grid, read_jsonl
from cocorec.bench.report import write_report
from cocorec.utils.io import atomic_write_text

REPO = Path(__file__).resolve().parents[2]


def collect(sources: list[Path], keys: set[str]) -> tuple[list[dict], int]:
    """The lines of ``sources`` whose run key is in ``keys``, the latest per key, in first-seen order."""
    by_key: dict[str, dict] = {}
    dropped = 0
    for src in sources:
        for r in read_jsonl(src):
            if r.get("run_key") in keys:
                by_key.pop(r["run_key"], None)   # re-insert: a later line moves to the end (latest wins)
                by_key[r["run_key"]] = r
            else:
                dropped += 1
    return list(by_key.values()), dropped


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        raise SystemExit(__doc__)
    grid_path, out, *sources = argv
    grid_path, sources = str(Path(grid_path).resolve()), [Path(p).resolve() for p in sources]
    out_dir = Path(os.path.relpath(Path(out).resolve(), REPO))
    os.chdir(REPO)  # paths in the report are relative to the repository
    grid = load_grid(grid_path)
    keys = {p.key for p in expand_grid(grid)}
    runs, dropped = collect([out_dir / "results.jsonl", *sources], keys)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in runs))
    report, plots = write_report(out_dir / "results.jsonl", out_dir / "REPORT.md", out_dir / "plots", grid=grid)
    print(f"{len(runs)} of {len(keys)} runs of {os.path.relpath(grid_path, REPO)} ({dropped} lines of other configurations left out)"
          f" -> {report}, {len(plots)} plots")


if __name__ == "__main__":
    main(sys.argv[1:])
