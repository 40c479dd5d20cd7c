"""Benchmarks: YAML grids of runs (resumable), Markdown reports and PNG plots over a results file.

    cocorec bench --grid grids/quick.yaml          # runs what is not done yet, then writes the report
    cocorec report --results runs/bench/quick/results.jsonl --output REPORT.md --plots-dir plots

Python:
    >>> from cocorec.bench import load_grid, expand_grid
    >>> grid = load_grid({"datasets": ["ml-100k"], "backbones": ["din"], "methods": ["base"], "seeds": [0, 1]})
    >>> [(p.backbone, p.method, p.seed) for p in expand_grid(grid, out_dir="runs/bench/x")]
    [('din', 'base', 0), ('din', 'base', 1)]
"""

from cocorec.bench.grid import (Grid, GridError, PlannedRun, expand_grid, load_grid, plan_status, run_grid)
from cocorec.bench.report import render_report, write_report
from cocorec.bench.results import aggregate, load_results, paired_ttest

__all__ = ["Grid", "GridError", "PlannedRun", "aggregate", "expand_grid", "load_grid", "load_results",
           "paired_ttest", "plan_status", "render_report", "run_grid", "write_report"]
