"""What does the LM history add to the behaviour sequence? Test AUC over samples of single per-sample
scores and of a logistic regression fitted on the training samples: the user's LM-history liked share
(what the template and the LM read), the behaviour sequence's mean rating (what every backbone sees),
and both. Per split seed.

    python docs/results/controls/history_vs_sequence.py
"""
import numpy as np
from sklearn.linear_model import LogisticRegression

from cocorec.data.protocol import ProtocolConfig, prepare
from cocorec.eval.metrics import auc
from cocorec.knowledge.sources import UserSource

for split_seed in (42, 43, 44):
    data = prepare("ml-100k", ProtocolConfig(split_seed=split_seed))
    liked = UserSource(data, "template").vectors()[:, 2]

    def features(name: str) -> tuple[np.ndarray, np.ndarray]:
        s = data.split(name)
        r = s.hist_ratings.astype(float)
        seq = np.where((r > 0).any(1), r.sum(1) / np.maximum((r > 0).sum(1), 1), 0.0)
        return np.column_stack([liked[s.user], seq]), s.label

    (xtr, ytr), (xte, yte) = features("train"), features("test")
    out = {"LM-history liked share": auc(yte, xte[:, 0]), "sequence mean rating": auc(yte, xte[:, 1])}
    for name, cols in (("LR on the sequence", [1]), ("LR on both", [0, 1])):
        lr = LogisticRegression().fit(xtr[:, cols], ytr)
        out[name] = auc(yte, lr.predict_proba(xte[:, cols])[:, 1])
    print(f"split {split_seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
