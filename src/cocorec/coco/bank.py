"""CoCo's per-user bank: the last LM output computed for each user, so a step runs the LM for a few
users only.

A training batch holds hundreds of users; the LM pass (soft prompt after the cached user text) with a
backward is affordable for a few dozen of them per step on a CPU. The others take their entry from
the bank. What the bank holds decides what stays fresh:

* ``"states"`` (default): the LM's last-layer states at the soft-prompt positions, ``[U, L, H]``. The
  read-out runs on every user of the batch at every step, so it (and the backbone) always sees the
  current read-out, and every sample of the batch trains it. Only the prompt states of the users who
  were not live are old (one epoch at most: the bank is refilled at each epoch's start).
* ``"knowledge"``: the knowledge vector ``k_u`` itself, ``[U, d]`` (the first reconstruction). The
  read-out trains on the live users' samples only, and most samples see a ``k_u`` computed by an
  older read-out than the one evaluation uses. Kept for the ablation.

The bank records the LM version it was filled with (the LoRA fingerprint); :meth:`stale` says when
a refill is due.

Example:
    >>> import torch
    >>> b = UserBank(n_users=4, shape=(2, 3))
    >>> b.put(torch.tensor([1, 3]), torch.ones(2, 2, 3))
    >>> rows = b.rows(torch.tensor([3, 0]), live=torch.tensor([1]), fresh=torch.full((1, 2, 3), 5.0))
    >>> rows[:, 0, 0].tolist()
    [1.0, 5.0]
    >>> b.stale("v1"), b.mark("v1"), b.stale("v1")
    (True, None, False)
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["BANK_KINDS", "UserBank"]

BANK_KINDS = ("states", "knowledge")


class UserBank:
    """``n_users`` rows of ``shape`` (no gradient), with the LM version they were computed under."""

    def __init__(self, n_users: int, shape: tuple[int, ...], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.table = torch.zeros((n_users, *shape), device=device, dtype=dtype)
        self.version: Any = None
        self.fills = 0

    def __len__(self) -> int:
        return self.table.shape[0]

    def put(self, users: torch.Tensor, values: torch.Tensor) -> None:
        self.table[users.to(self.table.device)] = values.detach().to(self.table.dtype)

    def rows(self, users: torch.Tensor, live: torch.Tensor | None = None,
             fresh: torch.Tensor | None = None) -> torch.Tensor:
        """The rows of ``users``; positions ``live`` (indices into ``users``) replaced by ``fresh``,
        which keeps its gradient."""
        out = self.table[users.to(self.table.device)]
        if live is None or len(live) == 0:
            return out
        return out.to(fresh.dtype).index_copy(0, live.to(out.device), fresh)   # type: ignore[union-attr]

    def stale(self, version: Any) -> bool:
        """True until :meth:`mark` was called with ``version`` (the LM changed since the last fill)."""
        return self.version is None or self.version != version

    def mark(self, version: Any) -> None:
        self.version = version
        self.fills += 1

    def invalidate(self) -> None:
        self.version = None
