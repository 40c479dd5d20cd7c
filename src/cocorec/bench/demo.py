"""The quick comparison behind ``cocorec demo``: base, kar and coco on DIN, ml-100k, seed 0 (KAR's LM in bf16
where the CPU computes bf16 natively, else float32).

It is a small bench grid (:data:`QUICK_GRID`, the same as ``grids/quick.yaml``): resumable (rerun to
continue; finished runs are not repeated), a method that fails (e.g. its LM is missing) is reported and
the others go on. Prints the comparison table and where the report and plots are.

Example:
    >>> from cocorec.bench.demo import demo_grid
    >>> demo_grid(quick=True).methods
    ['base', 'kar', 'coco']
"""

from __future__ import annotations

import copy
import fnmatch
from pathlib import Path
from typing import Any

from cocorec.bench.grid import Grid, load_grid, run_grid

# Mirrors grids/quick.yaml (that file is not installed with the package).
QUICK_GRID: dict[str, Any] = {
    "name": "quick",
    "datasets": ["ml-100k"],
    "backbones": ["din"],
    "methods": ["base", "kar", "coco"],
    "seeds": [0],
    "overrides": {"train.epochs": 2},
    # KAR's LM in the dtype the CPU computes fastest: bf16 where it is native (AVX512-BF16/AMX: cold generation
    # 17.6 vs 30.6 min in fp32), float32 where bf16 would be emulated (4.6-6.4x slower than fp32 on an AVX2 CPU);
    # benchmarks/RESULTS.md. Each dtype is its own cache entry (it is in the LM identity); KAR's default for
    # every other run stays fp32, the texts behind the published results.
    "method_overrides": {"kar": {"method.lm_dtype": "auto"}},
}
DEMO_DIR = "runs/demo"


def demo_grid(quick: bool = True, data_dir: str | None = None) -> Grid:
    """The demo's grid: ``quick`` trains 2 epochs; otherwise the trainer's defaults (early stopping).
    Both generate KAR's texts with ``lm_dtype=auto`` (``method_overrides``: bf16 where native)."""
    raw = copy.deepcopy(QUICK_GRID)
    raw["name"] = "demo" if quick else "demo-full"
    if not quick:
        raw["overrides"] = {}
    # a grid whose methods were changed (a subset, a test) keeps only the overrides of its own methods
    raw["method_overrides"] = {pat: ov for pat, ov in raw.get("method_overrides", {}).items()
                               if fnmatch.filter(raw["methods"], pat)}
    g = load_grid(raw)
    g.data_dir = data_dir
    return g


def run_demo(data_dir: str | None = None, quick: bool = True, out_dir: str = DEMO_DIR,
             quiet: bool = False, plots: bool = True) -> int:
    """Run the quick comparison and write ``<out_dir>/REPORT.md`` + ``<out_dir>/plots/``.

    Returns 0 when base, kar and coco all ran (or were already done), 1 when some failed (the table says
    which and why), 2 when none produced a result.
    """
    from cocorec.bench.report import write_report
    from cocorec.bench.results import aggregate, latest_runs, load_results

    grid = demo_grid(quick, data_dir)
    out = Path(out_dir) / ("quick" if quick else "full")
    results = out / "results.jsonl"
    print(f"cocorec demo: {', '.join(grid.methods)} on {grid.backbones[0].upper()}, {grid.datasets[0]}, "
          f"seed {grid.seeds[0]}{' (quick: 2 epochs)' if quick else ''}; runs in {out}")
    summary = run_grid(grid, out_dir=str(out), results=str(results), quiet=quiet)
    report_path, plot_paths = (None, [])
    if results.is_file():
        report_path, plot_paths = write_report(results, out / "REPORT.md", out / "plots", grid=grid, make_plots=plots)
    # the table: this grid's runs only (the results file may hold older configurations too)
    keys = {p.key for p in summary.runs}
    lines = load_results(results) if results.is_file() else []
    runs, _ = latest_runs(r for r in lines if r.get("run_key") in keys)
    agg = aggregate(runs).get(grid.datasets[0], {"cells": {}})
    cells = agg["cells"].get(grid.backbones[0], {})
    print()
    print(f"{'method':<8} {'status':<8} {'val AUC':>8} {'test AUC':>8} {'LogLoss':>8} {'GAUC':>8} {'RelaImpr':>9} "
          f"{'train s':>8}")
    n_ok = 0
    for p in summary.runs:
        c = cells.get(p.method)
        if c is None or p.status in ("failed", "unavailable"):
            why = summary.errors.get(p.key) or p.error or "no result"
            print(f"{p.method:<8} {'FAILED' if p.status == 'failed' else p.status.upper():<8} {why}")
            continue
        n_ok += 1
        ri = c.get("rela_impr")
        print(f"{p.method:<8} {p.status:<8} {c['val_auc']['mean']:>8.4f} {c['auc']['mean']:>8.4f} "
              f"{c['logloss']['mean']:>8.4f} {c['gauc']['mean']:>8.4f} "
              f"{(f'{ri:+.2f}%' if ri is not None else '—'):>9} {(c['train_seconds'] or 0):>8.1f}")
    print()
    if report_path:
        print(f"report: {report_path}")
    if plot_paths:
        print(f"plots:  {plot_paths[0].parent}/ ({', '.join(p.name for p in plot_paths)})")
    failed = [p for p in summary.runs if p.status in ("failed", "unavailable")]
    if failed:
        print(f"{len(failed)} method(s) did not finish: {', '.join(p.method for p in failed)} "
              f"(details in {results.with_name('failures.jsonl')}); rerun `cocorec demo` to retry")
    if n_ok == 0:
        return 2
    return 1 if failed else 0
