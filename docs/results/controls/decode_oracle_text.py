"""How much of the oracle's numbers survive KAR's text encoder (all-MiniLM-L6-v2)? 5-fold ridge R^2
over users of the label rate and of the per-genre rates, decoded from the embedding of the oracle
text (and, for comparison, of the template text).

    python docs/results/controls/decode_oracle_text.py
"""
import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import cross_val_score

from cocorec.data.protocol import ProtocolConfig, prepare
from cocorec.knowledge.base import build_method
from cocorec.knowledge.sources import UserSource


def r2(x: np.ndarray, y: np.ndarray) -> float:
    return float(cross_val_score(RidgeCV(alphas=np.logspace(-3, 3, 13)), x, y, cv=5, scoring="r2").mean())


data = prepare("ml-100k", ProtocolConfig(split_seed=42))
vec = UserSource(data, "oracle").vectors()          # [label rate, per-genre rates]
kar = build_method("kar", source="oracle")
kar.bind(data.spec)
store = kar.store(log=lambda *a: None)
for name in ("oracle", "template"):
    emb = store.encode(UserSource(data, name).user_texts())
    genres = np.mean([r2(emb, vec[:, j]) for j in range(1, vec.shape[1])])
    print(f"{name} text -> {emb.shape[1]}-d embedding: R2 of the label rate {r2(emb, vec[:, 0]):.3f}, "
          f"of the genre rates (mean) {genres:.3f}")
