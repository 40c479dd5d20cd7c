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
