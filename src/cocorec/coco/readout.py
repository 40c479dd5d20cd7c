"""CoCo's read-out : cross-attention from the prompt positions over H_u, then an MLP to k_u.

H_u is the LM's last-layer hidden states of the user text followed by the soft prompt. The L
prompt positions are the queries; keys/values are all positions of H_u (text padding masked).
The L attended vectors are averaged and an MLP maps them to the knowledge vector k_u.

Example:
    >>> import torch
    >>> r = CrossAttentionReadout(hidden_size=16, out_dim=8, attn_dim=8, heads=2)
    >>> r(torch.randn(3, 4, 16), torch.randn(3, 7, 16), torch.ones(3, 7)).shape
    torch.Size([3, 8])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cocorec.config import ConfigError


@dataclass
class ReadoutConfig:
    """The read-out's settings (config keys: ``--set method.knowledge_dim=16``).

    Example:
        >>> ReadoutConfig(knowledge_dim=8).build(hidden_size=16).mlp[-1].out_features
        8
    """

    knowledge_dim: int = 32          # width of k_u, the knowledge field the backbone reads
    readout_dim: int = 64            # attention width
    readout_heads: int = 2
    readout_hidden: int = 128        # hidden width of the MLP to k_u
    readout_over_text: bool = True   # attend over the text's states too (False: the prompt positions only)

    def __post_init__(self) -> None:
        if min(self.knowledge_dim, self.readout_dim, self.readout_heads, self.readout_hidden) < 1:
            raise ConfigError("knowledge_dim, readout_dim, readout_heads and readout_hidden must be >= 1")
        if self.readout_dim % self.readout_heads:
            raise ConfigError(f"readout_dim {self.readout_dim} must be divisible by readout_heads {self.readout_heads}")

    def build(self, hidden_size: int) -> "CrossAttentionReadout":
        return CrossAttentionReadout(hidden_size, self.knowledge_dim, attn_dim=self.readout_dim,
                                     heads=self.readout_heads, mlp_hidden=(self.readout_hidden,))


class CrossAttentionReadout(nn.Module):
    def __init__(self, hidden_size: int, out_dim: int = 32, attn_dim: int = 64, heads: int = 2,
                 mlp_hidden: Sequence[int] = (128,), dropout: float = 0.0) -> None:
        super().__init__()
        if attn_dim % heads:
            raise ValueError(f"attn_dim {attn_dim} must be divisible by heads {heads}")
        self.heads, self.attn_dim = heads, attn_dim
        self.norm = nn.LayerNorm(hidden_size)      # LM hidden states have a few huge features
        self.q = nn.Linear(hidden_size, attn_dim)
        self.k = nn.Linear(hidden_size, attn_dim)
        self.v = nn.Linear(hidden_size, attn_dim)
        layers: list[nn.Module] = []
        d = attn_dim
        for h in mlp_hidden:
            layers += [nn.Linear(d, h), nn.GELU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        layers.append(nn.Linear(d, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, h_prompt: torch.Tensor, h_text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``h_prompt`` [M, L, H]; ``h_text`` [M, T, H] with ``text_mask`` [M, T] (None: prompt positions only)."""
        dtype = self.q.weight.dtype
        hp = self.norm(h_prompt.to(dtype))
        m, n = hp.shape[:2]
        if h_text is not None:
            ht = self.norm(h_text.to(dtype))
            ctx = torch.cat([ht, hp], 1)
            mask = torch.cat([text_mask.bool() if text_mask is not None
                              else torch.ones(ht.shape[:2], dtype=torch.bool, device=ht.device),
                              torch.ones((m, n), dtype=torch.bool, device=hp.device)], 1)
        else:
            ctx, mask = hp, torch.ones((m, n), dtype=torch.bool, device=hp.device)
        dh = self.attn_dim // self.heads
        q = self.q(hp).view(m, n, self.heads, dh).transpose(1, 2)
        k = self.k(ctx).view(m, -1, self.heads, dh).transpose(1, 2)
        v = self.v(ctx).view(m, -1, self.heads, dh).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        pooled = out.transpose(1, 2).reshape(m, n, self.attn_dim).mean(1)
        return self.mlp(pooled)
