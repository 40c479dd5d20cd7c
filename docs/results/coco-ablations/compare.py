"""coco vs coco-novq on the oracle positive control (grids/coco-ablations.yaml), paired by (split, seed).

Per pair: base, the direct field, coco and coco-novq test AUC, and for the two CoCo arms what permuting
k_u across test users and zeroing it cost (the same trained model). Then paired differences over the
pairs of this directory's results (one machine), and over those plus the three coco-novq pairs of
grids/coco-controls.yaml (another machine: each pair's two arms ran on the same one).

    python docs/results/coco-ablations/compare.py [RESULTS.jsonl]
"""
import sys
from pathlib import Path

from cocorec.bench.results import latest_runs, load_results, paired_ttest

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


def summary(tab: dict[str, dict], label: str) -> None:
    auc = {m: {p: x["auc"] for p, x in d.items()} for m, d in tab.items()}
    print(f"\n{label}: paired differences (mean, two-sided paired t-test, pairs where a >= b)")
    for a, b in (("coco", "novq"), ("coco", "base"), ("novq", "base"), ("field", "base"), ("coco", "field")):
        r = paired_ttest(auc.get(a, {}), auc.get(b, {}))
        if not r["n_pairs"]:
            continue
        ge = sum(auc[a][p] >= auc[b][p] for p in set(auc[a]) & set(auc[b]))
        p = "n/a" if r["p"] is None else f"{r['p']:.3f}"
        print(f"  {a:5s} - {b:5s} {r['mean_diff']:+.4f}  p={p}  {ge}/{r['n_pairs']}")
    for m in ("coco", "novq"):
        pairs = sorted(set(auc.get(m, {})) & set(auc.get("field", {})) & set(auc.get("base", {})))
        if not pairs:
            continue
        gain = sum(auc[m][p] - auc["base"][p] for p in pairs) / len(pairs)
        field = sum(auc["field"][p] - auc["base"][p] for p in pairs) / len(pairs)
        perm = [tab[m][p]["perm"] - tab[m][p]["auc"] for p in pairs if tab[m][p]["perm"] is not None]
        k0 = [tab[m][p]["k0"] - tab[m][p]["auc"] for p in pairs if tab[m][p]["k0"] is not None]
        print(f"  {m}: {100 * gain / field:.0f}% of the field's gain over {len(pairs)} pairs; permuting k_u "
              f"{sum(perm) / len(perm):+.4f} ({min(perm):+.4f} to {max(perm):+.4f}), zeroing {sum(k0) / len(k0):+.4f}")


here = load(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.jsonl")
other = load(HERE.parent / "coco-controls" / "results.jsonl")
print("pair       method  test AUC  permuted  k=0     wall s  machine")
for p in sorted({p for d in here.values() for p in d}):
    for m in ("base", "field", "coco", "novq"):
        x = here.get(m, {}).get(p)
        if x is not None:
            print(f"{str(p):10s} {m:6s}  {f(x['auc'])}    {f(x['perm'])}  {f(x['k0'])}  {x['wall'] or 0:6.0f}  {x['cpu']}")
summary(here, "this directory's pairs (one machine)")

# The coco-novq pairs of grids/coco-controls.yaml (another CPU, the LM in bf16): the pairs this directory
# lacks are added with that grid's coco, base and field of the same pair; the pairs both have are shown
# side by side (the same runs on two machines).
theirs = sorted(other.get("novq", {}))
missing = [p for p in theirs if not (p in here.get("coco", {}) and p in here.get("novq", {}))]
if missing:
    both = {m: dict(here.get(m, {})) for m in SHORT.values()}
    for p in missing:
        for m in SHORT.values():
            if p in other.get(m, {}):
                both[m][p] = other[m][p]
    print(f"\ncoco-controls' coco-novq pairs added (their machine): {missing}")
    summary(both, "all pairs, each pair's arms from one machine")
shared = [p for p in theirs if p not in missing]
if shared:
    print("\nthe same pairs on the other machine (grids/coco-controls.yaml, bf16 LM) vs here (test AUC, coco - novq)")
    for p in shared:
        o, h = other, here
        print(f"  {p}: there coco {f(o['coco'][p]['auc'])} novq {f(o['novq'][p]['auc'])} "
              f"({o['coco'][p]['auc'] - o['novq'][p]['auc']:+.4f}); here coco {f(h['coco'][p]['auc'])} "
              f"novq {f(h['novq'][p]['auc'])} ({h['coco'][p]['auc'] - h['novq'][p]['auc']:+.4f})")
