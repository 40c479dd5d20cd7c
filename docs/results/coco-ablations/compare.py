"""coco vs coco-novq on the oracle positive control (grids/coco-ablations.yaml), pair by pair.

The paired tests, the share of the field's gain and the permuting / zeroing costs are in REPORT.md
(`cocorec report`); this prints what the report does not: per (split, seed) each arm's test AUC with its
knowledge permuted and zeroed (the same trained model), coco - coco-novq, and the pairs that
grids/coco-controls.yaml also ran on another CPU (the LM in bf16 there) beside this directory's.

    python docs/results/coco-ablations/compare.py [RESULTS.jsonl]
"""
import sys
from pathlib import Path

from cocorec.bench.results import latest_runs, load_results

HERE = Path(__file__).parent
SHORT = {"base": "base", "field[source=oracle]": "field", "coco[source=oracle]": "coco",
         "coco-novq[source=oracle]": "novq"}


def load(path: Path) -> dict[str, dict]:
    runs, _ = latest_runs(load_results(path))
    out: dict[str, dict] = {}
    for r in runs:
        m = SHORT.get(r["variant"])
        if m is None or r.get("backbone") != "din":
            continue
        t = r["metrics"]
        out.setdefault(m, {})[(r["split_seed"], r["seed"])] = {
            "auc": t["test"]["auc"],
            "perm": (t.get("test_knowledge_permuted") or {}).get("auc"),
            "k0": (t.get("test_no_knowledge") or {}).get("auc"),
            "wall": (r.get("cost") or {}).get("wall_seconds"),
            "cpu": (r.get("machine") or {}).get("cpu_model") or "cpu (model not recorded)",
        }
    return out


def f(v: float | None) -> str:
    return "   -  " if v is None else f"{v:.4f}"


here = load(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.jsonl")
print("pair       method  test AUC  permuted  k=0     wall s  machine")
for p in sorted({p for d in here.values() for p in d}):
    for m in ("base", "field", "coco", "novq"):
        x = here.get(m, {}).get(p)
        if x is not None:
            print(f"{str(p):10s} {m:6s}  {f(x['auc'])}    {f(x['perm'])}  {f(x['k0'])}  {x['wall'] or 0:6.0f}  {x['cpu']}")

coco, novq = here.get("coco", {}), here.get("novq", {})
pairs = sorted(set(coco) & set(novq))
diff = {p: coco[p]["auc"] - novq[p]["auc"] for p in pairs}
print(f"\ncoco - coco-novq per pair: {', '.join(f'{p} {d:+.4f}' for p, d in diff.items())}; "
      f">= 0 on {sum(d >= 0 for d in diff.values())} of {len(diff)} (paired test: REPORT.md)")

other = load(HERE.parent / "coco-controls" / "results.jsonl")
shared = [p for p in sorted(other.get("novq", {})) if p in diff]
if shared:
    print("\nthe same pairs on the other machine (grids/coco-controls.yaml, bf16 LM) vs here (test AUC, coco - novq)")
    for p in shared:
        o = other
        print(f"  {p}: there coco {f(o['coco'][p]['auc'])} novq {f(o['novq'][p]['auc'])} "
              f"({o['coco'][p]['auc'] - o['novq'][p]['auc']:+.4f}); here coco {f(coco[p]['auc'])} "
              f"novq {f(novq[p]['auc'])} ({diff[p]:+.4f})")
