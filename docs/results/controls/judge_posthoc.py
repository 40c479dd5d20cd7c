"""Which per-user judge score separates the corrupted users of a ``coco[...,corrupt=P]`` run, and how
much does it depend on whether corruption changed the user's text at all?

Inverting an oracle text maps a label rate r to 1 - r: for users with r near 0.5 the corrupted text
says nearly what the clean one says, so no judge can tell them apart. This prints the AUROC of the
contradiction rate, of minus the helps rate and of their difference, over all judged training users
and over those with |r - 0.5| > 0.15.

    python docs/results/controls/judge_posthoc.py RUN_DIR [RUN_DIR ...]   # coco runs with corrupt > 0
"""
import json
import sys

import numpy as np
from safetensors import safe_open

from cocorec.data.protocol import ProtocolConfig, prepare
from cocorec.eval.metrics import auc
from cocorec.knowledge.sources import UserSource

for d in sys.argv[1:]:
    cfg = json.load(open(f"{d}/metrics.json"))["config"]
    data = prepare(cfg["dataset"], ProtocolConfig(**cfg["protocol"]))
    src = UserSource(data, cfg["method_args"]["source"], cfg["method_args"]["corrupt"], cfg["seed"])
    with safe_open(f"{d}/checkpoint/model.safetensors", "pt") as f:
        counts = f.get_tensor("method/judge/user_counts").double().numpy()   # judged, contradicting, helped
    judged = counts[0] > 0
    c, h = counts[1] / np.maximum(counts[0], 1), counts[2] / np.maximum(counts[0], 1)
    bad = src.corrupted.astype(float)
    rate = np.array([src._oracle(u, False)[0] for u in range(data.n_users)])
    strong = judged & (np.abs(rate - 0.5) > 0.15)
    print(d.rstrip("/").split("/")[-1])
    for name, s in (("contradiction rate", c), ("- helps rate", -h), ("contradiction - helps", c - h)):
        print(f"  {name:22s} AUROC: all {judged.sum()} judged users {auc(bad[judged], s[judged]):.3f}; "
              f"the {strong.sum()} with |rate - 0.5| > 0.15 {auc(bad[strong], s[strong]):.3f}")
