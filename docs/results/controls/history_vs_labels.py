"""Does the LM history say anything about a user's labels? Correlation over users of the LM history's
liked share (and mean rating) with the user's label rate over their own CTR samples (protocol v1
gave r = 0.016: another user's history; v2 r = 0.40, as the raw data's earlier vs later interactions).

    python docs/results/controls/history_vs_labels.py
"""
import numpy as np

from cocorec.data.protocol import ProtocolConfig, prepare
from cocorec.knowledge.sources import UserSource

data = prepare("ml-100k", ProtocolConfig(split_seed=42))
rate = UserSource(data, "oracle").vectors()[:, 0]
t = UserSource(data, "template").vectors()        # [mean rating / 5, std / 2, liked share, ...]
print("corr(LM-history liked share, label rate over own samples):", round(float(np.corrcoef(t[:, 2], rate)[0, 1]), 3))
print("corr(LM-history mean rating, label rate):", round(float(np.corrcoef(t[:, 0], rate)[0, 1]), 3))
