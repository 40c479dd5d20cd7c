"""Replay CoCo's group guard of a trained run at several margins, on the run's own checkpoint.

Loads the run with the scorer (backbone, LM + LoRA, codebook, read-out), scores the validation split
with and without knowledge, and prints, per group of the run's guard grouping, the AUC with and
without knowledge and which groups the guard switches off at each margin; then the same per-group
AUCs on the test split (read here only to report, never to decide).

    python docs/results/coco-controls/guard_replay.py RUN_DIR [--grouping G] [MARGIN ...]
    # default: the run's own guard grouping; margins 0.005 0.002 0.001
"""
import sys

import numpy as np

from cocorec.coco.guard import GuardConfig, GroupGuard
from cocorec.eval.metrics import auc
from cocorec.serve import load_scorer

args = sys.argv[1:]
grouping = args.pop(args.index("--grouping") + 1) if "--grouping" in args else None
args = [a for a in args if a != "--grouping"]
run_dir, margins = args[0], [float(a) for a in args[1:]] or [0.005, 0.002, 0.001]
scorer = load_scorer(run_dir)
m, data = scorer.method, scorer.data
groupings = {**data.user_groups, **m.user_source(data).groups()}
cfg = m.cfg.guard
if grouping is not None:
    cfg = GuardConfig(guard_grouping=grouping, guard_min_samples=cfg.guard_min_samples)
print(f"{run_dir}: grouping {cfg.guard_grouping}")
decided: dict[str, list[str]] = {}   # guard setting -> groups switched off on validation
for split in ("val", "test"):
    s = data.split(split)
    p_with, p_without = scorer.score_split(split), scorer.score_split(split, use_knowledge=False)
    labels = groupings[cfg.guard_grouping]
    g = np.array([labels[u] for u in s.user])
    print(f"{split}: overall AUC with {auc(s.label, p_with):.4f}, without {auc(s.label, p_without):.4f}")
    for name in sorted(set(g)):
        k = g == name
        print(f"  {name:12s} n={int(k.sum()):5d}  with {auc(s.label[k], p_with[k]):.4f}  "
              f"without {auc(s.label[k], p_without[k]):.4f}")
    if split == "val":
        for margin in margins:
            guard = GroupGuard(GuardConfig(guard_grouping=cfg.guard_grouping, guard_margin=margin,
                                           guard_min_samples=cfg.guard_min_samples), groupings)
            rep = guard.decide(s.label, s.user, p_with, p_without)
            print(f"  margin {margin}: switched off {rep['disabled'] or 'nothing'}; val AUC "
                  f"{rep['val_auc_all_on']:.4f} -> {rep['val_auc_guarded']:.4f}")
            decided[f"margin {margin}"] = rep["disabled"]
        guard = GroupGuard(GuardConfig(guard_grouping=cfg.guard_grouping, guard_test="bootstrap",
                                       guard_min_samples=cfg.guard_min_samples), groupings, seed=m.seed)
        rep = guard.decide(s.label, s.user, p_with, p_without)
        shares = {k: round(v["harm_share"], 3) for k, v in rep["groups"].items()}
        print(f"  bootstrap (confidence 0.95, 200 user resamples): harm shares {shares}; switched off "
              f"{rep['disabled'] or 'nothing'}; val AUC {rep['val_auc_all_on']:.4f} -> {rep['val_auc_guarded']:.4f}")
        decided["bootstrap"] = rep["disabled"]
    else:
        for setting, off in decided.items():
            p = np.where(np.isin(g, off), p_without, p_with)
            parts = ", ".join(f"{name} {auc(s.label[g == name], p[g == name]):.4f}" for name in sorted(set(g)))
            print(f"  guarded as decided on val ({setting}: off {off or 'nothing'}): {auc(s.label, p):.4f}; {parts}")
