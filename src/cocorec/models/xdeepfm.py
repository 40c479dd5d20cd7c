"""xDeepFM (Lian et al., 2018): compressed interaction network + linear + DNN.

The CIN builds explicit vector-wise interactions layer by layer: layer k takes the outer
(Hadamard, per embedding dimension) products of its input feature maps with the field
embeddings ``X^0 = x.fields()`` and compresses them with a 1x1 convolution to ``H_k`` maps.
Each layer's maps are sum-pooled over the embedding dimension; the pooled vectors of all
layers feed a linear output. With ``split_half`` (default, as in the paper) every layer but
the last sends half of its maps to the next layer and half to the output.

The linear part is a first-order term over the dense field vectors (as in DeepFM here),
and the DNN reads the flattened fields.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from cocorec.data.protocol import FeatureSpec
from cocorec.models.base import BaseModel, Inputs, mlp, register


class CIN(nn.Module):
    """Compressed interaction network: [B, F, d] -> [B, sum of output maps]."""

    def __init__(self, num_fields: int, layer_sizes: Sequence[int] = (64, 64), split_half: bool = True) -> None:
        super().__init__()
        if not layer_sizes:
            raise ValueError("CIN needs at least one layer")
        self.split_half = split_half
        # The paper's 1x1 convolutions over the H_{k-1} * F product maps, as linear layers on a
        # channels-last layout (one GEMM; much faster than Conv1d on CPU).
        self.convs = nn.ModuleList()
        self.next_sizes: list[int] = []
        prev, self.output_dim = num_fields, 0
        for i, h in enumerate(layer_sizes):
            self.convs.append(nn.Linear(prev * num_fields, h))
            last = i == len(layer_sizes) - 1
            nxt = h // 2 if split_half and not last else h
            if nxt < 1:
                raise ValueError(f"CIN layer size {h} is too small to split in half")
            self.next_sizes.append(nxt)
            self.output_dim += h - nxt if split_half and not last else h
            prev = nxt

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        b, f, d = x0.shape
        x0 = x0.transpose(1, 2)                                          # [B, d, F], channels last
        xk, pooled = x0, []
        for i, conv in enumerate(self.convs):
            z = (xk.unsqueeze(3) * x0.unsqueeze(2)).reshape(b, d, -1)    # [B, d, H_{k-1} * F]
            h = conv(z)                                                  # [B, d, H_k]
            last = i == len(self.convs) - 1
            if self.split_half and not last:
                xk, out = h.split([self.next_sizes[i], h.shape[-1] - self.next_sizes[i]], dim=-1)
            else:
                xk, out = h, h
            pooled.append(out.sum(1))                                    # sum pooling over d
        return torch.cat(pooled, dim=1)


@register("xdeepfm")
class XDeepFM(BaseModel):
    def __init__(self, spec: FeatureSpec, knowledge_dims: Sequence[int] = (), embedding_dim: int = 16,
                 cin_layer_sizes: Sequence[int] = (64, 64), split_half: bool = True,
                 hidden_units: Sequence[int] = (256, 128, 64), dropout: float = 0.1, **kw: Any) -> None:
        super().__init__(spec, knowledge_dims, embedding_dim, **kw)
        self.linear = nn.Linear(self.num_fields * self.d, 1)
        self.cin = CIN(self.num_fields, cin_layer_sizes, split_half)
        self.cin_out = nn.Linear(self.cin.output_dim, 1)
        self.dnn = mlp(self.num_fields * self.d, hidden_units, dropout, out_dim=1)

    def score(self, x: Inputs) -> torch.Tensor:
        f = x.fields()                                       # [B, F, d]
        flat = f.flatten(1)
        return self.linear(flat) + self.cin_out(self.cin(f)) + self.dnn(flat)
