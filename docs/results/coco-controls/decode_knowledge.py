"""Where does the oracle's signal go on its way into the backbone? 5-fold ridge R^2 over users of the
label rate and of the per-genre rates (the oracle's numbers), decoded from a bundle's user knowledge:
the method's output (CoCo's k_u, KAR's adapter output) and the backbone's knowledge field after its
projection (the 16-d vector the backbone reads). Beside decode_oracle_text.py's figure for the MiniLM
embedding of the same text (label rate 0.983, genre rates 0.637), this locates the loss: in the text,
in the method's channel, or in the backbone's projection.

    cocorec export --run RUN_DIR --to BUNDLE        # the knowledge of every user, as the run computes it
    python docs/results/coco-controls/decode_knowledge.py BUNDLE [BUNDLE ...]
"""
import json
import sys

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import cross_val_score

from cocorec.data.protocol import ProtocolConfig, prepare
from cocorec.knowledge.sources import UserSource


def r2(x: np.ndarray, y: np.ndarray) -> float:
    return float(cross_val_score(RidgeCV(alphas=np.logspace(-3, 3, 13)), x, y, cv=5, scoring="r2").mean())


def decode(x: np.ndarray, vec: np.ndarray) -> tuple[float, float]:
    return r2(x, vec[:, 0]), float(np.mean([r2(x, vec[:, j]) for j in range(1, vec.shape[1])]))


def held_out(x: np.ndarray, y: np.ndarray, train: np.ndarray) -> tuple[float, float]:
    """R^2 of a ridge fitted on the training users, on the training users and on the others (the
    validation and test users, whose knowledge the method computes without having trained on them)."""
    m = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(x[train], y[train])
    return float(m.score(x[train], y[train])), float(m.score(x[~train], y[~train]))


for path in sys.argv[1:]:
    cfg = json.load(open(f"{path}/bundle.json"))
    ids = json.load(open(f"{path}/ids.json"))
    data = prepare(cfg["dataset"], ProtocolConfig(split_seed=int(cfg.get("split_seed") or 42)))
    if data.key != cfg["data_key"]:
        data = next(d for d in (prepare(cfg["dataset"], ProtocolConfig(split_seed=s)) for s in (42, 43, 44))
                    if d.key == cfg["data_key"])
    assert list(data.user_ids) == ids["users"], "bundle users are not the data's users in order"
    vec = UserSource(data, "oracle").vectors()            # [label rate, per-genre rates] per user
    tables, weights = load_file(f"{path}/tables.safetensors"), load_file(f"{path}/model.safetensors")
    field = [i for i, k in enumerate(cfg["knowledge"]) if k["key"] == "user"][0]
    k = tables[f"knowledge/{field}"].float()
    w, b = weights[f"knowledge_proj.{field}.weight"].float(), weights[f"knowledge_proj.{field}.bias"].float()
    proj = (k @ w.T + b).numpy()
    k = k.numpy()
    share = lambda x: float(((x - x.mean(0)) ** 2).sum() / max((x ** 2).sum(), 1e-12))   # noqa: E731
    print(f"{cfg['backbone']} {cfg['method']}{cfg.get('method_args') or ''} ({path}):")
    train = np.zeros(len(vec), dtype=bool)
    train[np.unique(data.split("train").user)] = True
    for name, x in (("method output", k), ("after the projection", proj)):
        lr, gr = decode(x, vec)
        fit, other = held_out(x, vec[:, 0], train)
        print(f"  {name:22s} {x.shape[1]:3d}-d: R2 label rate {lr:.3f}, genre rates (mean) {gr:.3f}; "
              f"between-user share {share(x):.3f}; label rate fitted on the {train.sum()} training users: "
              f"{fit:.3f} on them, {other:.3f} on the {(~train).sum()} others")
    torch.set_num_threads(1)
