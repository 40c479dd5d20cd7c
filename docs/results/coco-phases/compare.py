"""One LoRA phase vs four vs none on the swapped-oracle contradiction test (grids/coco-phases.yaml).

Per (split, seed): the corrupted and the clean test users' AUC with the knowledge and with it zeroed
(the same model), the LoRA updates each run made, and the final judge pass's AUROC at telling the
corrupted training users from the clean ones; then paired differences between the methods.

    python docs/results/coco-phases/compare.py [RESULTS.jsonl]   # default: this directory's results.jsonl
"""
import sys
from pathlib import Path

from cocorec.bench.results import latest_runs, load_results, paired_ttest

path = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("results.jsonl")
runs, _ = latest_runs(load_results(path))
SHORT = {"base": "base", "field[corrupt=0.3,corruption=swap,source=oracle]": "field",
         "coco[corrupt=0.3,corruption=swap,source=oracle]": "coco",
         "coco[cooldown_steps=20,corrupt=0.3,corruption=swap,max_phases=4,source=oracle]": "coco4",
         "coco-nojudge[corrupt=0.3,corruption=swap,source=oracle]": "nojudge"}


def get(r, *keys):
    for k in keys:
        r = r.get(k) if isinstance(r, dict) else None
    return r


table: dict[str, dict] = {}
for r in runs:
    m = SHORT.get(r["variant"])
    if m is None:
        continue
    pair = (r["split_seed"], r["seed"])
    row = {"auc": get(r, "metrics", "test", "auc")}
    for g in ("corrupted", "clean"):
        row[g] = get(r, "groups", "test", "corrupt", g, "auc")
        row[g + "_k0"] = get(r, "groups", "test_no_knowledge", "corrupt", g, "auc")
    row["updates"] = get(r, "diagnostics", "contradiction", "n_lora_updates")
    row["judge_drop"] = get(r, "diagnostics", "judge", "final", "corrupt_user_auroc_drop")
    row["wall_s"] = get(r, "cost", "wall_seconds")
    row["lm"] = get(r, "diagnostics", "lm", "dtype") or get(r, "diagnostics", "lm")
    table.setdefault(m, {})[pair] = row

pairs = sorted({p for t in table.values() for p in t})
print("pair       method   test AUC  corrupted (k=0)    clean (k=0)        LoRA updates  judge AUROC (drop)  wall s")
for p in pairs:
    for m in ("base", "field", "nojudge", "coco", "coco4"):
        x = table.get(m, {}).get(p)
        if x is None:
            continue
        f = lambda v: "   -  " if v is None else f"{v:.4f}"   # noqa: E731
        print(f"{str(p):10s} {m:8s} {f(x['auc'])}    {f(x['corrupted'])} ({f(x['corrupted_k0'])})  "
              f"{f(x['clean'])} ({f(x['clean_k0'])})  {x['updates'] if x['updates'] is not None else '-':>12}  "
              f"{f(x['judge_drop']):>18}  {x['wall_s'] or 0:6.0f}")

print("\npaired differences (mean over pairs, two-sided paired t-test)")
for what in ("corrupted", "clean", "auc"):
    for a, b in (("coco", "nojudge"), ("coco4", "nojudge"), ("coco4", "coco"), ("coco", "base"), ("coco4", "base")):
        ta, tb = table.get(a, {}), table.get(b, {})
        if what != "auc" and b == "base":
            continue
        t = paired_ttest({p: v[what] for p, v in ta.items()}, {p: v[what] for p, v in tb.items()})
        if t["n_pairs"]:
            ge = sum(ta[p][what] >= tb[p][what] for p in ta if p in tb)
            p_txt = "n/a" if t["p"] is None else f"{t['p']:.3f}"
            print(f"  {what:9s} {a} - {b}: {t['mean_diff']:+.4f} (p={p_txt}, {t['n_pairs']} pairs, >= on {ge})")
for m in ("nojudge", "coco", "coco4"):
    t = paired_ttest({p: v["corrupted"] for p, v in table.get(m, {}).items()},
                     {p: v["corrupted_k0"] for p, v in table.get(m, {}).items()})
    if t["n_pairs"]:
        print(f"  corrupted users, {m} with - without its knowledge: {t['mean_diff']:+.4f} ({t['n_pairs']} pairs)")
