"""Load a trained run directory (``checkpoint/config.json`` + ``model.safetensors``) and score.

The checkpoint is self-describing: backbone name and arguments, method name and arguments,
the feature spec and the processed-data key. Knowledge that depends on the user only
(KAR vectors, CoCo's k_u) travels in the checkpoint, so online scoring costs the backbone
plus one lookup.

Example:
    >>> scorer = load_scorer("runs/demo/din-base-0")                       # doctest: +SKIP
    >>> scorer.score_user("196", ["242", "302"])                           # doctest: +SKIP
    array([0.71, 0.43], dtype=float32)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cocorec.data.errors import DataError
from cocorec.data.protocol import CTRData, FeatureSpec, ProtocolConfig, prepare
from cocorec.knowledge.base import KnowledgeMethod, build_method
from cocorec.models import BaseModel, build_model
from cocorec.train.trainer import load_safetensors
from cocorec.utils.io import read_json


class Scorer:
    """A trained backbone + knowledge method, in eval mode."""

    def __init__(self, model: BaseModel, method: KnowledgeMethod, config: dict[str, Any],
                 data: CTRData | None = None) -> None:
        self.model, self.method, self.config, self.data = model.eval(), method.eval(), config, data
        method.attach(model)

    @torch.no_grad()
    def score_batch(self, batch: dict[str, torch.Tensor], use_knowledge: bool = True) -> np.ndarray:
        knowledge = self.method(batch) if use_knowledge else None
        return torch.sigmoid(self.model(batch, knowledge).float()).numpy()

    def score_split(self, split: str, batch_size: int = 8192) -> np.ndarray:
        if self.data is None:
            raise ValueError("score_split needs the processed data (load_scorer(..., data=...))")
        return np.concatenate([self.score_batch(b) for b in self.data.batches(split, batch_size)])

    def score_user(self, user_id: str, item_ids: Sequence[str]) -> np.ndarray:
        """Scores of candidate items for a known user, with the user's latest behaviour as history."""
        data = self.data
        if data is None:
            raise ValueError("score_user needs the processed data")
        try:
            u = data.user_ids.index(str(user_id))
        except ValueError:
            raise DataError(f"unknown user id {user_id!r}") from None
        item_index = {iid: i + 1 for i, iid in enumerate(data.item_ids)}
        missing = [i for i in item_ids if str(i) not in item_index]
        if missing:
            raise DataError(f"unknown item id(s) {missing[:5]}")
        # The user's most recent interactions: the last sample's history plus that sample's item.
        T = data.spec.max_hist_len
        hist_i, hist_r = _latest_history(data, u, T)
        items = torch.tensor([item_index[str(i)] for i in item_ids])
        n = len(items)
        hist = torch.tensor(hist_i).repeat(n, 1)
        batch = {
            "user": torch.full((n,), u), "item": items, "label": torch.zeros(n),
            "user_feats": data.user_feats[torch.full((n,), u)], "item_feats": data.item_feats[items],
            "item_tags": data.item_tags[items], "hist_items": hist, "hist_feats": data.item_feats[hist],
            "hist_tags": data.item_tags[hist], "hist_ratings": torch.tensor(hist_r).repeat(n, 1),
            "hist_mask": hist > 0,
        }
        return self.score_batch(batch)


def _latest_history(data: CTRData, u: int, T: int) -> tuple[list[int], list[int]]:
    for name in ("train", "val", "test"):
        s = data.split(name)
        rows = np.flatnonzero(s.user == u)
        if len(rows):
            j = rows[np.argmax(s.position[rows])]
            items = list(s.hist_items[j][1:]) + [int(s.item[j])]
            # the rating of the last item is unknown to the split arrays' history; use its label
            ratings = list(s.hist_ratings[j][1:]) + [5 if s.label[j] > 0 else 1]
            return items[-T:], ratings[-T:]
    a, b = data.llm_offsets[u], data.llm_offsets[u + 1]
    items = [0] * T + data.llm_items[a:b].tolist()
    ratings = [0] * T + data.llm_ratings[a:b].tolist()
    return items[-T:], ratings[-T:]


def load_scorer(run_dir: str | Path, data: CTRData | None = None, data_dir: str | None = None,
                load_data: bool = True) -> Scorer:
    """Rebuild backbone and method from a run directory's checkpoint and load the weights."""
    ck = Path(run_dir) / "checkpoint"
    if not (ck / "config.json").is_file() or not (ck / "model.safetensors").is_file():
        raise DataError(f"no trained checkpoint in {ck} (expected config.json and model.safetensors)")
    cfg = read_json(ck / "config.json")
    spec = FeatureSpec(**cfg["spec"])
    method = build_method(cfg["method"], **cfg.get("method_args", {}))
    method.bind(spec)
    model = build_model(cfg["backbone"], spec, knowledge_dims=cfg.get("knowledge_dims", []), **cfg.get("model", {}))
    tensors = load_safetensors(ck / "model.safetensors")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    method.load_checkpoint_state({k[7:]: v for k, v in tensors.items() if k.startswith("method/")})
    if data is None and load_data:
        proto = cfg.get("protocol", {})
        if "split_ratios" in proto:
            proto["split_ratios"] = tuple(proto["split_ratios"])
        data = prepare(cfg["dataset"], ProtocolConfig(**proto), data_dir=data_dir)
        if cfg.get("data_key") and data.key != cfg["data_key"]:
            raise DataError(f"the data found for {cfg['dataset']!r} differs from the data the model was trained on "
                            f"(key {data.key} != {cfg['data_key']})")
    return Scorer(model, method, cfg, data)
