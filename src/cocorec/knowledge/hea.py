"""KAR's hybrid-expert adaptor (HEA): dense text vectors -> small knowledge fields for a CTR model.

There is one input per knowledge type (KAR: user preference reasoning, item facts), all of the same
width (one sentence encoder). Each type t has

* ``n_shared`` *shared* experts (the same networks for every type) and ``n_specific`` experts of its
  own, each an MLP ``in_dim -> hidden[0] -> ... -> hidden[-1]`` (default ``[128, 32]``);
* a gate ``softmax(W_t x_t)`` over its ``n_shared + n_specific`` experts.

Output of type t: ``sum_k g_{t,k} * expert_k(x_t)``: one ``hidden[-1]``-d vector per type, used as
extra dense fields of the backbone.

Example:
    >>> import torch
    >>> hea = HybridExpertAdaptor(in_dim=384, n_types=2, n_shared=2, n_specific=2, hidden=(128, 32))
    >>> user, item = torch.randn(5, 384), torch.randn(5, 384)
    >>> outs, gates = hea([user, item], return_gates=True)
    >>> [tuple(o.shape) for o in outs], tuple(gates[0].shape)
    ([(5, 32), (5, 32)], (5, 4))
    >>> bool(torch.allclose(gates[1].sum(-1), torch.ones(5)))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["HybridExpertAdaptor", "expert_mlp"]


def expert_mlp(in_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """An expert: Linear + ReLU (+ dropout) between layers, a linear last layer."""
    if not hidden:
        raise ValueError("an expert needs at least one layer size")
    layers: list[nn.Module] = []
    d = in_dim
    for j, h in enumerate(hidden):
        layers.append(nn.Linear(d, h))
        if j < len(hidden) - 1:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        d = h
    return nn.Sequential(*layers)


class HybridExpertAdaptor(nn.Module):
    """Shared + type-specific experts with one softmax gate per knowledge type (see module docstring)."""

    def __init__(self, in_dim: int, n_types: int = 2, n_shared: int = 2, n_specific: int = 2,
                 hidden: Sequence[int] = (128, 32), dropout: float = 0.0) -> None:
        super().__init__()
        if n_types < 1 or n_shared < 0 or n_specific < 0 or n_shared + n_specific < 1:
            raise ValueError(f"need n_types >= 1 and at least one expert per type "
                             f"(got n_types={n_types}, n_shared={n_shared}, n_specific={n_specific})")
        self.in_dim, self.n_types = int(in_dim), int(n_types)
        self.n_shared, self.n_specific = int(n_shared), int(n_specific)
        self.out_dim = int(hidden[-1])
        self.shared = nn.ModuleList(expert_mlp(in_dim, hidden, dropout) for _ in range(n_shared))
        self.specific = nn.ModuleList(
            nn.ModuleList(expert_mlp(in_dim, hidden, dropout) for _ in range(n_specific)) for _ in range(n_types))
        self.gates = nn.ModuleList(nn.Linear(in_dim, n_shared + n_specific) for _ in range(n_types))

    @property
    def out_dims(self) -> list[int]:
        """Width of each output (one per knowledge type)."""
        return [self.out_dim] * self.n_types

    def forward(self, inputs: Sequence[torch.Tensor], return_gates: bool = False
                ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``inputs[t]``: ``[B, in_dim]`` -> list of ``[B, out_dim]`` (and the gate weights ``[B, n_experts]``)."""
        if len(inputs) != self.n_types:
            raise ValueError(f"expected {self.n_types} inputs (one per knowledge type), got {len(inputs)}")
        outs, gates = [], []
        for t, x in enumerate(inputs):
            if x.shape[-1] != self.in_dim:
                raise ValueError(f"input {t} has width {x.shape[-1]}, expected {self.in_dim}")
            experts = [e(x) for e in self.shared] + [e(x) for e in self.specific[t]]
            stacked = torch.stack(experts, dim=-2)                      # [B, E, out]
            g = torch.softmax(self.gates[t](x), dim=-1)                 # [B, E]
            outs.append((g.unsqueeze(-1) * stacked).sum(-2))
            gates.append(g)
        return (outs, gates) if return_gates else outs
