"""AutoInt (Song et al., 2019): self-attentive feature interactions.

Each interacting layer runs multi-head self-attention across the fields ``x.fields()``
(queries, keys and values projected to ``attention_dim`` per head, dot-product scores,
unscaled as in the paper unless ``use_scale``), concatenates the heads and adds a residual
projection of its input, followed by ReLU. The final field vectors are flattened into a linear
output. With ``hidden_units`` non-empty (default) a DNN over ``x.flat()`` is added to the logit
(AutoInt+ in the paper); ``hidden_units=()`` gives plain AutoInt.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cocorec.data.protocol import FeatureSpec
from cocorec.models.base import BaseModel, Inputs, mlp, register


class InteractingLayer(nn.Module):
    """Multi-head self-attention over fields with a residual connection: [B, F, I] -> [B, F, H * A]."""

    def __init__(self, in_dim: int, attention_dim: int, num_heads: int, use_scale: bool = False) -> None:
        super().__init__()
        self.heads, self.att_dim, self.use_scale = num_heads, attention_dim, use_scale
        out = num_heads * attention_dim
        self.qkv = nn.Linear(in_dim, 3 * out, bias=False)
        self.residual = nn.Linear(in_dim, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, _ = x.shape
        q, k, v = (t.view(b, f, self.heads, self.att_dim).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v, scale=None if self.use_scale else 1.0)  # [B, H, F, A]
        o = o.transpose(1, 2).reshape(b, f, self.heads * self.att_dim)
        return torch.relu(o + self.residual(x))


@register("autoint")
class AutoInt(BaseModel):
    def __init__(self, spec: FeatureSpec, knowledge_dims: Sequence[int] = (), embedding_dim: int = 16,
                 attention_layers: int = 3, num_heads: int = 2, attention_dim: int = 32, use_scale: bool = False,
                 hidden_units: Sequence[int] = (256, 128, 64), dropout: float = 0.1, **kw: Any) -> None:
        super().__init__(spec, knowledge_dims, embedding_dim, **kw)
        dims = [self.d] + [num_heads * attention_dim] * attention_layers
        self.interacting = nn.Sequential(*(InteractingLayer(dims[i], attention_dim, num_heads, use_scale)
                                           for i in range(attention_layers)))
        self.out = nn.Linear(self.num_fields * dims[-1], 1)
        self.dnn = mlp(self.num_fields * self.d, hidden_units, dropout, out_dim=1) if hidden_units else None

    def score(self, x: Inputs) -> torch.Tensor:
        f = x.fields()                                       # [B, F, d]
        logit = self.out(self.interacting(f).flatten(1))
        if self.dnn is not None:
            logit = logit + self.dnn(f.flatten(1))
        return logit
