"""The committed results behind the README's knowledge table still load and print (docs/results/tables.py)."""

from __future__ import annotations

import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_results_tables_print_every_method(capsys) -> None:
    mod = runpy.run_path(str(REPO / "docs" / "results" / "tables.py"))
    cells = mod["load"]()
    mod["main_table"](cells)
    mod["group_tables"](cells)
    out = capsys.readouterr().out
    for b in ("DIN", "DCNv2"):
        for m in ("base", "base (CPU)", "static", "kar", "r4ec", "coco-novq", "coco-nojudge", "coco"):
            assert f"| {b} | {m} | 0,1,2 (" in out, (b, m)
    # kar ran on the CPU, so it is compared with the CPU base; coco with the H100 base
    assert "| DIN | kar | 0,1,2 (CPU) |" in out and "| DIN | coco | 0,1,2 (H100) |" in out
    assert out.count("| female / 35-44 |") == 1 and "hurts" in out


def test_full_grid_results_keep_only_the_grids_runs_latest_first(tmp_path: Path) -> None:
    mod = runpy.run_path(str(REPO / "docs" / "results" / "collect.py"))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"run_key": "k1", "v": 1}\n{"run_key": "other", "v": 2}\n{"run_key": "k2", "v": 3}\n')
    b.write_text('{"run_key": "k1", "v": 4}\nnot json\n')
    runs, dropped = mod["collect"]([a, b], {"k1", "k2", "k3"})
    assert [r["v"] for r in runs] == [3, 4] and dropped == 1              # later line wins, other configs out


def test_committed_full_grid_results_are_runs_of_bench_full_yaml() -> None:
    """Every committed line is a cell of grids/full.yaml (its run keys predate the one-seed config)."""
    from cocorec.bench.grid import expand_grid, load_grid, read_jsonl
    from cocorec.bench.report import render_report

    grid = load_grid(REPO / "grids" / "full.yaml")
    cells = {(p.dataset, p.backbone, p.method, p.seed) for p in expand_grid(grid)}
    lines = read_jsonl(REPO / "docs" / "results" / "full" / "results.jsonl")
    assert len(lines) >= 42 and all((r["dataset"], r["backbone"], r["method"], r["seed"]) in cells for r in lines)
    text = render_report(lines, grid=grid)
    assert "## ml-100k" in text and "## ml-1m-3k" in text and "| deepfm | kar | 3 |" in text
