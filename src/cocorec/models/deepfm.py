"""DeepFM (Guo et al., 2017): factorisation machine + deep network over the same field embeddings."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from cocorec.data.protocol import FeatureSpec
from cocorec.models.base import BaseModel, Inputs, mlp, register


@register("deepfm")
class DeepFM(BaseModel):
    def __init__(self, spec: FeatureSpec, knowledge_dims: Sequence[int] = (), embedding_dim: int = 16,
                 hidden_units: Sequence[int] = (256, 128, 64), dropout: float = 0.1, **kw: Any) -> None:
        super().__init__(spec, knowledge_dims, embedding_dim, **kw)
        self.linear = nn.Linear(self.num_fields * self.d, 1)  # first-order term over dense field vectors
        self.dnn = mlp(self.num_fields * self.d, hidden_units, dropout, out_dim=1)

    def score(self, x: Inputs) -> torch.Tensor:
        f = x.fields()                                       # [B, F, d]
        fm = 0.5 * (f.sum(1).pow(2) - f.pow(2).sum(1)).sum(-1, keepdim=True)
        flat = f.flatten(1)
        return self.linear(flat) + fm + self.dnn(flat)
