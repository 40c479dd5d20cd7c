"""Collect the runs of ``bench/full.yaml`` into ``docs/results/full/`` and render its report.

    .venv/bin/python docs/results/full.py runs/bench/full/results.jsonl [more results files ...]

Keeps only lines whose run key is one of the grid's (the key is a hash of the whole run
configuration, so a kept line is a run of exactly the grid's configuration, wherever it ran);
when a run appears more than once the later line wins (files in the order given, after what
``full/results.jsonl`` already holds and after ``ml100k-din-dcnv2.jsonl``, whose DIN/DCNv2 runs
share the grid's keys). Writes ``full/results.jsonl``, ``full/REPORT.md`` and ``full/plots/``;
runs the grid does not have yet are listed as missing.
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
HERE = Path("docs/results")          # relative to REPO: the report names its results file as written here
OUT = HERE / "full"


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
    argv = [str(Path(a).resolve()) for a in argv]
    os.chdir(REPO)
    grid = load_grid("bench/full.yaml")
    keys = {p.key for p in expand_grid(grid)}
    sources = [p for p in (HERE / "ml100k-din-dcnv2.jsonl", OUT / "results.jsonl") if p.is_file()]
    sources += [Path(a) for a in argv]
    runs, dropped = collect(sources, keys)
    OUT.mkdir(exist_ok=True)
    atomic_write_text(OUT / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in runs))
    report, plots = write_report(OUT / "results.jsonl", OUT / "REPORT.md", OUT / "plots", grid=grid)
    print(f"{len(runs)} of {len(keys)} runs of bench/full.yaml ({dropped} lines of other configurations left out)"
          f" -> {report}, {len(plots)} plots")


if __name__ == "__main__":
    main(sys.argv[1:])
