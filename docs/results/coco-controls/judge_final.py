"""The final judge pass (``judge.final_pass``) of a finished run with ``corrupt > 0``: CoCo runs trained
before it existed, and the direct field (``field[...,corrupt=P]``: the cleanest channel, the bound).

The same computation as ``CoCo.on_fit_end``: every training user judged once with the trained model and
fresh knowledge (every guard group on), ``judge_predictions`` sample by sample, ``UserJudgeStats`` per
user; prints the AUROC of each per-user score at telling corrupted users from clean ones, and
``decoded``: the correlation, over the corrupted users, of the knowledge's mean shift p+ - p0 with the
label rate their knowledge states (positive: the backbone follows what it is told; negative: it has
learnt to read their knowledge backwards).

    python docs/results/coco-controls/judge_final.py RUN_DIR [RUN_DIR ...]
"""
import json
import sys

import numpy as np
import torch

from cocorec.coco.judge import UserJudgeStats
from cocorec.serve.scorer import load_scorer

torch.set_num_threads(1)
for run in sys.argv[1:]:
    sc = load_scorer(run)
    m, data = sc.method, sc.data
    if getattr(m, "guard", None) is not None:
        m.guard.enabled.fill_(True)
    m.user_source(data)
    s = data.split("train")
    p_plus, p_zero = sc.score_split("train"), sc.score_split("train", use_knowledge=False)
    stats = UserJudgeStats.from_predictions(data.n_users, s.user, p_plus, p_zero, s.label, json.load(
        open(f"{run}/metrics.json"))["config"]["method_config"].get("delta", 0.02))
    out = stats.summary(m.user_groups()["corrupt"])
    src = m.user_source(data)
    bad = src.corrupted & (stats.counts[0] > 0).numpy()
    shift = (stats.counts[3] / stats.counts[0].clamp_min(1)).numpy()
    decoded = float(np.corrcoef(shift[bad], src.vectors("rate")[bad, 0])[0, 1])
    print(json.dumps({"run": run.rstrip("/").split("/")[-1], "decoded": round(decoded, 3),
                      **{k: round(v, 3) for k, v in out.items() if k.startswith("corrupt_user_auroc")}}), flush=True)
