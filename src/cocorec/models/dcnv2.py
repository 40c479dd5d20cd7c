"""DCNv2 (Wang et al., 2021): improved deep & cross network.

A cross network of matrix cross layers, ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` over the
flattened fields ``x.flat()``, with full-rank ``W_l`` or, with ``low_rank=r``, the low-rank
``W_l = U_l V_l^T`` (``U_l, V_l`` of shape [D, r]; the paper's cost-saving variant, without
its mixture of experts). Combined with a deep MLP either in parallel (``stacked=False``,
default: the outputs of both are concatenated) or stacked (the MLP reads the cross output).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from cocorec.data.protocol import FeatureSpec
from cocorec.models.base import BaseModel, Inputs, mlp, register


class CrossLayerV2(nn.Module):
    """One matrix cross layer: ``x0 * (W x + b) + x`` with full-rank or low-rank W."""

    def __init__(self, dim: int, low_rank: int | None = None) -> None:
        super().__init__()
        if low_rank is None:
            self.w: nn.Module = nn.Linear(dim, dim)
        else:
            if low_rank < 1:
                raise ValueError(f"low_rank must be a positive int or None, got {low_rank}")
            self.w = nn.Sequential(nn.Linear(dim, low_rank, bias=False), nn.Linear(low_rank, dim))  # U (V^T x) + b

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.w(x) + x


@register("dcnv2")
class DCNv2(BaseModel):
    def __init__(self, spec: FeatureSpec, knowledge_dims: Sequence[int] = (), embedding_dim: int = 16,
                 num_cross_layers: int = 3, low_rank: int | None = None, stacked: bool = False,
                 hidden_units: Sequence[int] = (256, 128, 64), dropout: float = 0.1, **kw: Any) -> None:
        super().__init__(spec, knowledge_dims, embedding_dim, **kw)
        dim = self.num_fields * self.d
        self.stacked = stacked
        self.cross = nn.ModuleList(CrossLayerV2(dim, low_rank) for _ in range(num_cross_layers))
        self.dnn = mlp(dim, hidden_units, dropout)
        dnn_out = hidden_units[-1] if hidden_units else dim
        self.out = nn.Linear(dnn_out if stacked else dim + dnn_out, 1)

    def score(self, x: Inputs) -> torch.Tensor:
        x0 = x.flat()                                        # [B, F * d]
        c = x0
        for layer in self.cross:
            c = layer(x0, c)
        if self.stacked:
            return self.out(self.dnn(c))
        return self.out(torch.cat([c, self.dnn(x0)], dim=-1))
