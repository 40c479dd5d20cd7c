"""DIN (Zhou et al., 2018): Deep Interest Network.

A *local activation unit* scores every history item against the target item from
``[target, hist, target - hist, target * hist]`` with a small MLP (Dice or PReLU activation).
The scores are used as they are (no softmax, as in the paper, so the pooled vector keeps the
intensity of the interest) to take a weighted sum of the history items. The pooled interest,
the target, the user fields and the knowledge fields go through an MLP.

Padded history positions are never scored: the attention unit only sees the valid positions
(``x.mask``), so neither their content nor Dice's batch statistics depend on padding.

For serving, :meth:`DIN.for_inference` folds the unit's first layer: ``W [t, h, t - h, t * h]`` is
``(W_t + W_d) t + (W_h - W_d) h + W_p (t * h)``, the target's term once per row instead of once per history
position and no 4-wide concatenation (the same scores to float rounding, about half the unit's work).

Also home of :class:`Dice` and :func:`dnn`, the activation-aware MLP shared with DIEN.
"""

from __future__ import annotations

import copy
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


class ActivationUnit(nn.Sequential):
    """DIN's local activation unit: an MLP over ``[t, h, t - h, t * h]`` of each valid history position.

    Call Args:
        target: [B, Di]; hist: [B, T, Di]; mask: [B, T], True at valid positions.

    Returns:
        [N] the score of every valid position (N = mask.sum()), in the order of ``hist[mask]``.
    """

    def forward(self, target: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = hist[mask]                                                   # [N, Di] valid positions only
        t = target.unsqueeze(1).expand_as(hist)[mask]                    # [N, Di]
        return super().forward(torch.cat([t, h, t - h, t * h], dim=-1)).squeeze(-1)


class FoldedActivationUnit(nn.Module):
    """An :class:`ActivationUnit` folded for inference: the same scores to float rounding, with less work.

    The first layer is split by input (see the module), so the target's term is computed once per row;
    every position of ``hist`` is scored densely and the valid ones picked from the [B, T] scores (no
    gather of [B, T, Di]); a first Dice in eval mode becomes ``x * (alpha + (1 - alpha) * sigmoid(x * s + c))``
    with its running statistics folded into ``s`` and ``c`` (4 passes over [B, T, H] instead of ~9). Built
    from a trained unit, never trained (Dice's batch statistics are not computed here).

    Example:
        >>> torch.manual_seed(0) is not None
        True
        >>> unit = ActivationUnit(*dnn(4 * 8, (16,), "dice", out_dim=1)).eval()
        >>> t, h, mask = torch.randn(3, 8), torch.randn(3, 5, 8), torch.rand(3, 5) > 0.3
        >>> bool((FoldedActivationUnit(unit)(t, h, mask) - unit(t, h, mask)).abs().max() < 1e-5)
        True
    """

    def __init__(self, unit: ActivationUnit) -> None:
        super().__init__()
        layers = list(unit)
        first = layers[0]
        assert isinstance(first, nn.Linear)
        wt, wh, wd, wp = first.weight.detach().chunk(4, dim=1)
        self.register_buffer("w_target", (wt + wd).contiguous())
        self.register_buffer("bias", first.bias.detach().clone())
        self.register_buffer("w_hist", (wh - wd).contiguous())
        self.register_buffer("w_product", wp.contiguous())
        dice = layers[1] if len(layers) > 1 and isinstance(layers[1], Dice) else None
        self.dice = dice is not None
        if dice is not None:
            scale = torch.rsqrt(dice.running_var + dice.eps)
            self.register_buffer("scale", scale.clone())
            self.register_buffer("shift", (-dice.running_mean * scale).clone())
            self.register_buffer("alpha", dice.alpha.detach().clone())
            self.register_buffer("one_minus_alpha", (1.0 - dice.alpha.detach()).clone())
        self.rest = copy.deepcopy(nn.Sequential(*layers[2 if self.dice else 1:]))

    def forward(self, target: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, T, di = hist.shape
        a = torch.nn.functional.linear(target, self.w_target, self.bias).unsqueeze(1)        # [B, 1, H]
        z = torch.addmm(torch.nn.functional.linear(hist.reshape(b * T, di), self.w_hist),
                        (target.unsqueeze(1) * hist).view(b * T, di), self.w_product.t())
        z = (z.view(b, T, -1) + a).view(b * T, -1)           # [B * T, H]: 2-D, as the unit's layers see it
        if self.dice:
            p = torch.sigmoid(torch.addcmul(self.shift, z, self.scale))
            z = z * torch.addcmul(self.alpha, p, self.one_minus_alpha)
        return self.rest(z).view(b, T)[mask]


@register("din")
class DIN(BaseModel):
    def __init__(self, spec: FeatureSpec, knowledge_dims: Sequence[int] = (), embedding_dim: int = 16,
                 hidden_units: Sequence[int] = (256, 128, 64), dropout: float = 0.1,
                 dnn_activation: str = "relu", attention_hidden_units: Sequence[int] = (64,),
                 attention_activation: str = "dice", **kw: Any) -> None:
        super().__init__(spec, knowledge_dims, embedding_dim, **kw)
        di = self.item_dim
        self.attention: nn.Module = ActivationUnit(*dnn(4 * di, attention_hidden_units, attention_activation,
                                                        out_dim=1))
        in_dim = (self.n_user_fields + self.n_knowledge) * self.d + 2 * di
        self.dnn = dnn(in_dim, hidden_units, dnn_activation, dropout, out_dim=1)

    def interest(self, x: Inputs) -> torch.Tensor:
        """Attention-weighted sum of the valid history items: [B, Di]."""
        w = self.attention(x.target, x.hist, x.mask)                   # [N] valid positions only
        weights = w.new_zeros(x.mask.shape).masked_scatter(x.mask, w)   # [B, T], 0 at padding
        return torch.einsum("bt,btd->bd", weights, x.hist)

    def for_inference(self, item_feats: torch.Tensor | None = None,
                      item_tags: torch.Tensor | None = None) -> "DIN":
        """As :meth:`BaseModel.for_inference`, with the activation unit folded (see the module)."""
        m = super().for_inference(item_feats, item_tags)
        if isinstance(m.attention, ActivationUnit):
            m.attention = FoldedActivationUnit(m.attention)
        return m

    def score(self, x: Inputs) -> torch.Tensor:
        parts = [x.user.flatten(1), x.target, self.interest(x), x.knowledge.flatten(1)]
        return self.dnn(torch.cat(parts, dim=-1))
