"""Print the knowledge-comparison tables of README / docs/coco.md from the results lines in this folder.

    .venv/bin/python docs/results/tables.py          # the DIN/DCNv2 headline and group tables
    .venv/bin/python docs/results/tables.py --full   # README's "full grid so far" table (full/results.jsonl)

``ml100k-din-dcnv2.jsonl``: the runs of ``grids/ml100k-din-dcnv2.yaml`` (base/static/coco* mostly on
an H100, kar/r4ec on the 2-core CPU; each line names its machine). ``ml100k-base-cpu.jsonl``: the
backbones alone on that CPU, the same-machine reference of kar and r4ec.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from cocorec.bench.grid import read_jsonl
from cocorec.bench.results import BACKBONE_ORDER, METHOD_ORDER, aggregate, latest_runs, mean_std, paired_ttest

HERE = Path(__file__).resolve().parent
GROUPING = "gender x age_group"
METHODS = ("base", "base (CPU)", "static", "kar", "r4ec", "coco-novq", "coco-nojudge", "coco")
# Paper spellings of the backbone names (the registry's class is XDeepFM).
BACKBONE_NAMES = {"din": "DIN", "dien": "DIEN", "dcnv2": "DCNv2", "deepfm": "DeepFM", "autoint": "AutoInt",
                  "xdeepfm": "xDeepFM"}
BACKBONES = {b: BACKBONE_NAMES[b] for b in ("din", "dcnv2")}  # the headline grid's two


def load() -> dict[tuple[str, str], dict[int, dict]]:
    runs, _ = latest_runs(json.loads(line) for line in open(HERE / "ml100k-din-dcnv2.jsonl"))
    cells: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for r in runs:
        cells[(r["backbone"], r["method"])][r["seed"]] = r
    for line in open(HERE / "ml100k-base-cpu.jsonl"):
        r = json.loads(line)
        cells[(r["backbone"], "base (CPU)")][r["seed"]] = r
    return cells


def on_cpu(r: dict) -> bool:
    return "cuda" not in r.get("machine", {}).get("device", "")


def fmt(values, d: int = 4) -> str:
    s = mean_std(values)
    if s["mean"] is None:
        return "—"
    return f"{s['mean']:.{d}f} ± {s['std']:.{d}f}" if s["std"] is not None else f"{s['mean']:.{d}f}"


def reference(rs: dict) -> str:
    """kar/r4ec (all on the CPU) compare with the CPU base; everything else with the H100 base."""
    return "base (CPU)" if all(on_cpu(r) for r in rs.values()) else "base"


def main_table(cells) -> None:
    print("| backbone | method | seeds (ran on) | test AUC | LogLoss | GAUC | RelaImpr vs base (same machine) "
          "| AUC, knowledge zeroed | Δ AUC vs kar (paired p) | Δ AUC vs base, same machine (paired p) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b, name in BACKBONES.items():
        kar = {s: r["metrics"]["test"]["auc"] for s, r in cells[(b, "kar")].items()}
        for m in METHODS:
            rs = dict(sorted(cells.get((b, m), {}).items()))
            if not rs:
                continue
            auc = {s: r["metrics"]["test"]["auc"] for s, r in rs.items()}
            ref_name = reference(rs)
            ref = {s: r["metrics"]["test"]["auc"] for s, r in cells[(b, ref_name)].items()}
            where = "/".join(dict.fromkeys("CPU" if on_cpu(r) else "H100" for r in rs.values()))
            k0 = [(r["metrics"].get("test_no_knowledge") or {}).get("auc") for r in rs.values()]

            def vs(other: dict, other_name: str) -> str:
                if m == other_name:
                    return "(ref)"
                t = paired_ttest(auc, other)
                if t["mean_diff"] is None:
                    return "—"
                return f"{t['mean_diff']:+.4f}" + (f" (p={t['p']:.2f})" if t["p"] is not None else "")

            rel = ""
            if not m.startswith("base"):
                a, r0 = mean_std(auc.values())["mean"], mean_std(ref.values())["mean"]
                rel = f"{((a - 0.5) / (r0 - 0.5) - 1) * 100:+.2f}%"
            metric = lambda k: [r["metrics"]["test"][k] for r in rs.values()]  # noqa: E731
            print(f"| {name} | {m} | {','.join(map(str, rs))} ({where}) | {fmt(auc.values())} | {fmt(metric('logloss'))} "
                  f"| {fmt(metric('gauc'))} | {rel} | {fmt(x for x in k0 if x is not None) if any(k0) else '—'} "
                  f"| {vs(kar, 'kar') if m != 'base (CPU)' else '—'} | {vs(ref, ref_name)} |")


def group_tables(cells, margin: float = 0.001) -> None:
    auc: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    size: dict[str, tuple[int, int]] = {}
    for (b, m), rs in cells.items():
        for r in rs.values():
            for g, v in r["groups"]["test"][GROUPING].items():
                auc[(b, m)][g].append(v["auc"])
                size[g] = (v["n"], v["users"])
    groups = sorted(size)
    print("| group | test samples (users) | DIN base (CPU) | kar Δ | DIN base (H100) | coco Δ "
          "| DCNv2 base (CPU) | kar Δ | DCNv2 base (H100) | coco Δ |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for g in groups:
        row = [g, f"{size[g][0]} ({size[g][1]})"]
        for b in BACKBONES:
            for m, ref in (("kar", "base (CPU)"), ("coco", "base")):
                base = float(np.mean(auc[(b, ref)][g]))
                d = float(np.mean(auc[(b, m)][g])) - base
                row += [f"{base:.4f}", f"**{d:+.4f}**" if d < -margin else f"{d:+.4f}"]
        print("| " + " | ".join(row) + " |")
    print(f"\nWhich groups each method hurts (mean group AUC more than {margin} below the same-machine base):\n")
    for b, name in BACKBONES.items():
        for m in METHODS[2:]:
            rs = cells.get((b, m), {})
            ref = reference(rs)
            diffs = [(g, float(np.mean(auc[(b, m)][g]) - np.mean(auc[(b, ref)][g]))) for g in groups]
            hurt = [f"{g} ({d:+.4f})" for g, d in diffs if d < -margin]
            print(f"- {name} {m} hurts {len(hurt)}/{len(groups)}" + (": " + ", ".join(hurt) if hurt else ""))


def full_grid_table(path: Path = HERE / "full" / "results.jsonl") -> None:
    """Test AUC mean ± std per dataset, backbone x method (the report's cells); under 3 seeds a cell names them.

    A cell more than 0.004 below the same backbone's base (pooled test AUC) is bold.
    """
    records = read_jsonl(path)
    print(f"{len(latest_runs(records)[0])} runs")
    datasets = aggregate(records)
    for ds in sorted(datasets, key=lambda d: (d != "ml-100k", d)):
        cells = datasets[ds]["cells"]
        print(f"\n| {ds} | " + " | ".join(METHOD_ORDER) + " |")
        print("|---|" + "---:|" * len(METHOD_ORDER))
        for b in BACKBONE_ORDER:
            row = cells.get(b, {})
            base = row["base"]["auc"]["mean"] if "base" in row else None
            texts = []
            for m in METHOD_ORDER:
                c = row.get(m)
                if c is None:
                    texts.append("—")
                    continue
                text = fmt(c["auc_by_pair"].values())
                seeds = sorted(seed for _, seed in c["auc_by_pair"])   # one split (42) in this grid
                if len(seeds) < 3:
                    text += f" (seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))})"
                if base is not None and m != "base" and c["auc"]["mean"] < base - 0.004:
                    text = f"**{text}**"
                texts.append(text)
            print(f"| {BACKBONE_NAMES[b]} | " + " | ".join(texts) + " |")


if __name__ == "__main__":
    import sys

    if "--full" in sys.argv[1:]:
        full_grid_table()
        raise SystemExit(0)
    cells = load()
    main_table(cells)
    print()
    group_tables(cells)
