"""``cocorec bench`` and ``cocorec report`` (listed in :func:`cocorec.cli.commands`).

    cocorec bench --grid grids/quick.yaml [--results F] [--out-dir runs/bench/quick] [--dry-run] [--quiet]
    cocorec bench --grid grids/full.yaml --methods base,kar,r4ec    # a part of the grid now, the rest later
    cocorec report --results runs/bench/quick/results.jsonl [--output REPORT.md] [--plots-dir DIR]

``bench`` runs every run of the grid that is not already in the results file (rerun it after an
interruption: finished runs are skipped, an interrupted one resumes), records failures in
``failures.jsonl`` and goes on, then writes ``REPORT.md`` and ``plots/`` next to the results.
Exit code: 0 when every run is done, 1 when some failed or were unavailable, 2 for a bad grid.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.description = "Run a grid of datasets x backbones x methods x seeds (resumable), then write the report."
    p.add_argument("--grid", required=True, help="grid YAML (e.g. grids/quick.yaml, grids/full.yaml, grids/ci.yaml)")
    p.add_argument("--results", default=None, help="results JSONL (default: the grid's, else <out-dir>/results.jsonl)")
    p.add_argument("--out-dir", default=None,
                   help="run directories (default: the grid's out_dir, else runs/bench/<name>)")
    p.add_argument("--data-dir", default=None, help="directory holding the datasets (overrides the grid's data_dir)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are cached; run nothing")
    p.add_argument("--quiet", action="store_true", help="one line per run (no per-epoch logs or progress bars)")
    p.add_argument("--no-report", action="store_true", help="do not write REPORT.md and plots at the end")
    p.add_argument("--report", default=None, help="report path (default: REPORT.md next to the results)")
    p.add_argument("--plots-dir", default=None, help="plots directory (default: plots/ next to the report)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only every N-th run starting at I (0-based), e.g. 4 processes: 0/4 .. 3/4 "
                        "sharing one results file; run once more without --shard for the report")
    for what, example in (("datasets", "ml-100k"), ("backbones", "din,deepfm"), ("methods", "base,kar,r4ec"),
                           ("seeds", "0,1"), ("splits", "42,43")):
        p.add_argument(f"--{what}", default=None, metavar="A,B",
                       help=f"run only these {what} of the grid (e.g. {example}); same run directories and "
                            f"results file, and the report still lists the rest of the grid as missing")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"1/4"`` -> ``(1, 4)``; ``None`` -> ``None``."""
    if text is None:
        return None
    from cocorec.bench.grid import GridError, check_shard

    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise GridError(f"--shard must look like I/N, e.g. 0/4 (got {text!r})") from None
    return check_shard(i, n)


def cmd_bench(args: argparse.Namespace) -> int:
    from cocorec.bench.grid import default_out_dir, default_results, load_grid, run_grid, subset_grid
    from cocorec.bench.report import write_report

    grid = load_grid(args.grid)
    shard = parse_shard(args.shard)
    if args.data_dir:
        grid.data_dir = args.data_dir
    todo = subset_grid(grid, datasets=args.datasets, backbones=args.backbones, methods=args.methods,
                       seeds=args.seeds, split_seeds=args.splits)
    out_dir = args.out_dir or default_out_dir(grid)
    results = args.results or default_results(grid, out_dir)
    try:
        summary = run_grid(todo, out_dir=out_dir, results=results, quiet=args.quiet, dry_run=args.dry_run,
                           shard=shard)
    finally:
        if not args.dry_run and not args.no_report and shard is None and Path(results).is_file():
            report, plots = write_report(results, args.report, args.plots_dir, grid=grid)
            print(f"report: {report}" + (f" ({len(plots)} plots in {plots[0].parent})" if plots else ""))
    if args.dry_run:
        return 0
    return 0 if summary.ok else 1


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.description = "Aggregate a results JSONL into a Markdown report (mean ± std over seeds) and PNG plots."
    p.add_argument("--results", default="runs/results.jsonl", help="results JSONL (default: runs/results.jsonl)")
    p.add_argument("--output", default=None, help="Markdown report (default: REPORT.md next to the results)")
    p.add_argument("--plots-dir", default=None, help="PNG plots directory (default: plots/ next to the report)")
    p.add_argument("--no-plots", action="store_true", help="Markdown only")
    p.add_argument("--grid", default=None, help="grid YAML: runs of the grid without results are listed as missing")
    p.add_argument("--hurt-margin", type=float, default=0.001,
                   help="a method hurts a group when the group's AUC is this much below base's (default 0.001)")
    p.add_argument("--print", dest="print_report", action="store_true", help="also print the report")


def cmd_report(args: argparse.Namespace) -> int:
    from cocorec.bench.grid import load_grid
    from cocorec.bench.report import write_report
    from cocorec.bench.results import load_results
    from cocorec.data.errors import DataError

    if not Path(args.results).is_file():
        raise DataError(f"results file {args.results} not found (run `cocorec bench --grid ...` or "
                        f"`cocorec train ...` first, or pass --results)")
    grid = load_grid(args.grid) if args.grid else None
    report, plots = write_report(args.results, args.output, args.plots_dir, grid=grid, make_plots=not args.no_plots,
                                 hurt_margin=args.hurt_margin)
    n = len(load_results(args.results))
    if args.print_report:
        print(report.read_text(encoding="utf-8"))
    print(f"wrote {report} from {n} result lines" + (f"; {len(plots)} plots in {plots[0].parent}" if plots else ""))
    return 0

