"""The VQ codebook of CoCo : K keys, each with a soft prompt of L LM-input vectors.

A user's query ``q_u`` picks the nearest key ``k* = argmin_k ||q_u - c_k||``; the soft prompt
``P_k*`` goes to the LM. The VQ loss is ``||sg(q) - c_k*||^2 + beta ||q - sg(c_k*)||^2``.

Straight-through: the prompt actually given to the LM is ``P_k* + U e`` with
``e = q + sg(c_k* - q)``. Its *value* is ``P_k* + U c_k*`` (a function of the code only, so the
LM output of a user depends on the code, not on the exact query), while the gradient of ``e``
goes to the query unchanged (VQ-VAE's estimator), so the task loss reaches the query. ``U``
starts at zero: at initialisation the prompts are exactly real token embeddings.

Collapse is countered by dead-code reset: keys that no user picked over a window are moved onto
randomly chosen recent queries (their prompts are kept). Usage perplexity ``exp(H(usage))`` is
reported (K = every code used equally, 1 = collapse).

Example:
    >>> import torch
    >>> cb = VQCodebook(num_codes=4, key_dim=3, prompt_len=2, hidden_size=5)
    >>> out = cb(torch.randn(6, 3))
    >>> out.codes.shape, out.prompts.shape, out.loss.ndim
    (torch.Size([6]), torch.Size([6, 2, 5]), 0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cocorec.config import ConfigError


@dataclass
class CodebookConfig:
    """The codebook's settings (each a config key: ``--set method.codebook_size=8``).

    Example:
        >>> CodebookConfig(codebook_size=4).build(hidden_size=5).prompts.shape
        torch.Size([4, 8, 5])
    """

    codebook_size: int = 16      # K codes, each a key and a soft prompt
    prompt_len: int = 8          # L soft tokens per prompt
    key_dim: int = 32            # width of the query and of the keys
    vq: bool = True              # False: each user keeps a random fixed code (no query, no VQ loss)
    vq_beta: float = 0.25        # commitment weight of the VQ loss
    vq_weight: float = 1.0       # weight of the VQ loss in the training loss
    reset_every: int = 20        # steps between dead-code resets (0: never)

    def __post_init__(self) -> None:
        if min(self.codebook_size, self.prompt_len, self.key_dim) < 1:
            raise ConfigError(f"codebook_size, prompt_len and key_dim must be >= 1 (got {self.codebook_size}, "
                             f"{self.prompt_len}, {self.key_dim})")
        if self.reset_every < 0 or self.vq_beta < 0 or self.vq_weight < 0:
            raise ConfigError("reset_every, vq_beta and vq_weight must be >= 0")

    def build(self, hidden_size: int) -> "VQCodebook":
        return VQCodebook(self.codebook_size, self.key_dim, self.prompt_len, hidden_size, beta=self.vq_beta,
                          straight_through=self.vq)


@dataclass
class VQOutput:
    codes: torch.Tensor     # [B] selected code per query
    prompts: torch.Tensor   # [B, L, H] soft prompt per query (straight-through to the query)
    loss: torch.Tensor      # scalar VQ loss (codebook + beta * commitment), mean over queries
    distances: torch.Tensor  # [B, K] squared distances (detached)


def perplexity(counts: torch.Tensor) -> float:
    """``exp(entropy)`` of a usage histogram: K when uniform over K codes, 1 when one code is used.

    Example:
        >>> round(perplexity(torch.tensor([5.0, 5.0, 0.0, 0.0])), 6)
        2.0
    """
    c = counts.detach().double().flatten()
    total = float(c.sum())
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(math.exp(float(-(p * p.log()).sum())))


class VQCodebook(nn.Module):
    """K keys (``key_dim``) + K soft prompts (``prompt_len`` x ``hidden_size``) + usage tracking."""

    def __init__(self, num_codes: int, key_dim: int, prompt_len: int, hidden_size: int, beta: float = 0.25,
                 straight_through: bool = True) -> None:
        super().__init__()
        if num_codes < 1 or prompt_len < 1:
            raise ValueError(f"num_codes and prompt_len must be >= 1 (got {num_codes}, {prompt_len})")
        self.num_codes, self.key_dim, self.prompt_len, self.hidden_size = num_codes, key_dim, prompt_len, hidden_size
        self.beta = beta
        self.keys = nn.Parameter(torch.randn(num_codes, key_dim))
        self.prompts = nn.Parameter(torch.randn(num_codes, prompt_len, hidden_size) * 0.02)
        self.st_proj = nn.Linear(key_dim, prompt_len * hidden_size, bias=False) if straight_through else None
        if self.st_proj is not None:
            nn.init.zeros_(self.st_proj.weight)
        self.register_buffer("usage", torch.zeros(num_codes))          # picks since the last reset check
        self.register_buffer("total_usage", torch.zeros(num_codes))    # picks over training
        self.register_buffer("n_resets", torch.zeros((), dtype=torch.long))
        self._recent: torch.Tensor | None = None                       # recent queries (for resets)

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_prompts_from_embeddings(self, embedding: torch.Tensor, generator: torch.Generator | None = None,
                                     token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Set every prompt vector to the LM embedding of a token (random distinct tokens by default).

        ``embedding``: the LM's input-embedding matrix [V, H]. Returns the token ids used [K, L].
        """
        v = embedding.shape[0]
        n = self.num_codes * self.prompt_len
        if token_ids is None:
            perm = torch.randperm(v, generator=generator)
            token_ids = perm[:n] if n <= v else perm[torch.randint(0, v, (n,), generator=generator)]
        token_ids = token_ids.reshape(self.num_codes, self.prompt_len)
        self.prompts.copy_(embedding[token_ids.to(embedding.device)].to(self.prompts))
        return token_ids

    @torch.no_grad()
    def init_keys_from_queries(self, queries: torch.Tensor, generator: torch.Generator | None = None,
                               noise: float = 0.01) -> None:
        """Data-dependent start: each key = a distinct random query (+ small noise)."""
        q = queries.detach().to(self.keys)
        idx = torch.randperm(q.shape[0], generator=generator)
        if q.shape[0] < self.num_codes:
            idx = torch.randint(0, q.shape[0], (self.num_codes,), generator=generator)
        base = q[idx[: self.num_codes].to(q.device)]
        self.keys.copy_(base + noise * torch.randn(base.shape, generator=generator).to(base))

    # ------------------------------------------------------------------ selection
    def distances(self, q: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances [B, K]."""
        c = self.keys.to(q.dtype)
        return (q.pow(2).sum(-1, keepdim=True) - 2 * q @ c.t() + c.pow(2).sum(-1)[None, :]).clamp_min(0)

    def select(self, q: torch.Tensor) -> torch.Tensor:
        return self.distances(q.detach()).argmin(-1)

    def prompt_of(self, codes: torch.Tensor) -> torch.Tensor:
        """The prompts of ``codes`` as the LM sees them (no query): ``P_k + U c_k`` [B, L, H]."""
        p = self.prompts[codes]
        if self.st_proj is not None:
            p = p + self.st_proj(self.keys[codes]).view(-1, self.prompt_len, self.hidden_size)
        return p

    def forward(self, q: torch.Tensor, record: bool = True) -> VQOutput:
        d = self.distances(q.detach()).detach()
        codes = d.argmin(-1)
        c = self.keys[codes]
        loss = F.mse_loss(c, q.detach(), reduction="none").sum(-1).mean() \
            + self.beta * F.mse_loss(q, c.detach(), reduction="none").sum(-1).mean()
        prompts = self.prompts[codes]
        if self.st_proj is not None:
            e = q + (c - q).detach()                  # value c_k*, gradient to q
            prompts = prompts + self.st_proj(e).view(-1, self.prompt_len, self.hidden_size)
        if record and self.training:
            self.record(codes, q)
        return VQOutput(codes=codes, prompts=prompts, loss=loss, distances=d)

    # ------------------------------------------------------------------ usage and dead codes
    @torch.no_grad()
    def record(self, codes: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        counts = torch.bincount(codes.flatten(), minlength=self.num_codes).to(self.usage)
        self.usage += counts
        self.total_usage += counts
        if queries is not None:
            q = queries.detach().float().cpu()
            self._recent = q if self._recent is None else torch.cat([self._recent, q])[-4096:]

    @torch.no_grad()
    def reset_dead_codes(self, min_usage: float = 1.0, generator: torch.Generator | None = None,
                         noise: float = 0.01) -> int:
        """Move keys picked fewer than ``min_usage`` times since the last call onto recent queries.

        Returns the number of codes reset; clears the window counts.
        """
        dead = (self.usage < min_usage).nonzero().flatten()
        n = 0
        if len(dead) and self._recent is not None and len(self._recent):
            pick = torch.randint(0, len(self._recent), (len(dead),), generator=generator)
            new = self._recent[pick]
            new = new + noise * torch.randn(new.shape, generator=generator)
            self.keys[dead] = new.to(self.keys)
            n = int(len(dead))
            self.n_resets += n
        self.usage.zero_()
        return n

    def usage_perplexity(self) -> float:
        return perplexity(self.total_usage)
