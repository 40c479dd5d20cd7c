"""DIN (Zhou et al., 2018): Deep Interest Network.

A *local activation unit* scores every history item against the target item from
``[target, hist, target - hist, target * hist]`` with a small MLP (Dice or PReLU activation).
The scores are used as they are (no softmax, as in the paper, so the pooled vector keeps the
intensity of the interest) to take a weighted sum of the history items. The pooled interest,
the target, the user fields and the knowledge fields go through an MLP.

Padded history positions are never scored: the attention unit only sees the valid positions
(``x.mask``), so neither their content nor Dice's batch statistics depend on padding.

Also home of :class:`Dice` and :func:`dnn`, the activation-aware MLP shared with DIEN.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from cocorec.data.protocol import FeatureSpec
from cocorec.models.base import BaseModel, Inputs, register


class Dice(nn.Module):
    """Data-adaptive activation (DIN paper, eq. 7): ``p(s) * s + (1 - p(s)) * alpha * s``.

    ``p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))`` with the mean and variance of the
    mini-batch in training (running averages in eval mode, and in training when the batch has
    a single row). Input: [N, dim].
    """

    def __init__(self, dim: int, eps: float = 1e-8, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.alpha = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        x = s.float()                                   # statistics in float32, also under autocast
        if self.training and x.shape[0] > 1:
            mean = x.mean(0)
            var = x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(x.detach().var(0, unbiased=True), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((x - mean) * torch.rsqrt(var + self.eps))
        return (p * x + (1.0 - p) * self.alpha * x).to(s.dtype)


ACTIVATIONS = ("dice", "prelu", "relu")


def activation(name: str, dim: int) -> nn.Module:
    """An activation module by name (``dice``, ``prelu`` with one slope per unit, ``relu``)."""
    key = name.lower()
    if key == "dice":
        return Dice(dim)
    if key == "prelu":
        return nn.PReLU(dim)
    if key == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}; one of {ACTIVATIONS}")


def dnn(in_dim: int, hidden: Sequence[int], act: str = "relu", dropout: float = 0.0,
        out_dim: int | None = None) -> nn.Sequential:
    """Like :func:`cocorec.models.base.mlp`, with an activation that may need the layer width."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), activation(act, h)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = h
    if out_dim is not None:
        layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


@register("din")
class DIN(BaseModel):
    def __init__(self, spec: FeatureSpec, knowledge_dims: Sequence[int] = (), embedding_dim: int = 16,
                 hidden_units: Sequence[int] = (256, 128, 64), dropout: float = 0.1,
                 dnn_activation: str = "relu", attention_hidden_units: Sequence[int] = (64,),
                 attention_activation: str = "dice", **kw: Any) -> None:
        super().__init__(spec, knowledge_dims, embedding_dim, **kw)
        di = self.item_dim
        self.attention = dnn(4 * di, attention_hidden_units, attention_activation, out_dim=1)
        in_dim = (self.n_user_fields + self.n_knowledge) * self.d + 2 * di
        self.dnn = dnn(in_dim, hidden_units, dnn_activation, dropout, out_dim=1)

    def interest(self, x: Inputs) -> torch.Tensor:
        """Attention-weighted sum of the valid history items: [B, Di]."""
        mask = x.mask
        h = x.hist[mask]                                                # [N, Di] valid positions only
        t = x.target.unsqueeze(1).expand_as(x.hist)[mask]               # [N, Di]
        w = self.attention(torch.cat([t, h, t - h, t * h], dim=-1)).squeeze(-1)  # [N]
        weights = w.new_zeros(mask.shape).masked_scatter(mask, w)       # [B, T], 0 at padding
        return torch.einsum("bt,btd->bd", weights, x.hist)

    def score(self, x: Inputs) -> torch.Tensor:
        parts = [x.user.flatten(1), x.target, self.interest(x), x.knowledge.flatten(1)]
        return self.dnn(torch.cat(parts, dim=-1))
