"""Data-parallel training with ``torchrun``: the process group, the sharded sampler and the gathers.

``torchrun --nproc_per_node=N -m cocorec train ...`` starts N copies of the same run. Each reads the
torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), joins
one process group (gloo on the CPU, NCCL on CUDA, one GPU per process: ``cuda:LOCAL_RANK``) and trains
the same model wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`. Without those
variables every function here is the single-process identity, so the trainer has one code path.

The rules that make N processes train the run one process trains:

* **Global batch.** ``train.batch_size`` is the global batch. Every process draws the same seeded
  permutation of the training split per epoch (the one :meth:`CTRData.batches` draws); global batch
  ``i`` is rows ``[i*B, (i+1)*B)`` of it, and rank ``r`` takes the contiguous slice
  ``[b*r//N, b*(r+1)//N)`` of a batch of ``b`` rows (``b = B`` but for the epoch's last batch), so
  each process takes ``B/N`` samples and one step sees the batch one process would see.
* **Loss weight.** Each rank's loss (a mean over its slice) is multiplied by ``n_r * N / b``: DDP's
  gradient average is then the gradient of the mean over the whole global batch, also when the
  slices are uneven (a rank left without a row takes one with weight 0). What this cannot make equal
  is what a model computes over the batch itself: DIN's Dice uses the statistics of its own slice.
* **Evaluation.** Rank ``r`` predicts the contiguous slice ``[n*r//N, n*(r+1)//N)`` of a split;
  :func:`all_gather_rows` puts the slices back in order on every rank, so each rank holds exactly
  the full split's predictions (padding dropped, no row twice) and computes the same AUC/GAUC, hence
  takes the same early-stopping decision.
* **Writes.** Rank 0 alone writes checkpoints, ``last/``, metrics.json and the results line; every
  rank reads ``last/`` to resume. Buffers (Dice's running statistics) are rank 0's: they are
  broadcast at each epoch's end, before evaluation and ``last/``; each rank's RNG state is saved.
* **Method state.** What a method keeps outside DDP's parameters it keeps equal on every rank itself,
  with these collectives, called by every rank at the same point of every step (CoCo: its bank,
  judge, phase scheduler, codebook resets and LoRA gradients, see :mod:`cocorec.coco.method`).

Example (one process: the identity; under torchrun the same calls shard and gather):
    >>> setup(torch.device("cpu"))
    device(type='cpu')
    >>> world_size(), rank(), is_main()
    (1, 0, True)
    >>> shard(10, 1, 4)        # rank 1 of 4 takes rows 2..4 of 10
    (2, 5)
    >>> all_gather_rows(np.arange(3.0)).tolist()
    [0.0, 1.0, 2.0]
"""

from __future__ import annotations

import atexit
import datetime
import inspect
import os
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cocorec.config import ConfigError

__all__ = ["DistributedError", "all_gather_rows", "all_sum", "barrier", "broadcast_buffers", "check_supported",
           "env_world_size", "eval_rows", "gather_rng_states", "is_main", "main_first", "rank", "setup", "shard",
           "train_batches", "world_size", "wrap"]

#: How long a rank waits at a collective for the others (rank 0 alone prepares the data and the
#: method's caches first; a knowledge cache built inside the run must finish within it).
TIMEOUT = datetime.timedelta(hours=1)


class DistributedError(ConfigError):
    """A run that cannot be trained by several processes (a method that does not support it, or
    torchrun's variables half set)."""


# ----------------------------------------------------------------------------- the process group
def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 without torchrun): known before the group is joined."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        n = int(raw)
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={raw!r} is not an integer; launch with torchrun") from None
    if n < 1:
        raise DistributedError(f"WORLD_SIZE={n} must be >= 1; launch with torchrun")
    return n


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group once per process (gloo for the CPU, NCCL for CUDA) and return
    this rank's device (``cuda:LOCAL_RANK`` for CUDA). Without torchrun: ``device`` unchanged."""
    if env_world_size() == 1:
        return device
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; "
                               f"launch with torchrun --nproc_per_node=N -m cocorec train ...")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        atexit.register(_shutdown)
    return device


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (it fills the caches: processed data, knowledge vectors), then the
    others run it and read them."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def check_supported(method_cls: Any, name: str) -> None:
    """A :class:`DistributedError` before any work when ``WORLD_SIZE > 1`` and the method keeps
    per-process training state nothing synchronises: a method says so with a class attribute
    ``supports_distributed = False`` (no registered method does now; CoCo synchronises its bank,
    judge, scheduler, codebook resets and LoRA itself, :mod:`cocorec.coco.method`)."""
    if env_world_size() == 1:
        return
    if not getattr(method_cls, "supports_distributed", True):
        raise DistributedError(f"method {name} cannot train in several processes (it keeps per-process training "
                               f"state); run it with one process (no torchrun)")


# ----------------------------------------------------------------------------- sharding
def shard(n: int, r: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that rank ``r`` (default: this one) of ``world`` takes: contiguous,
    sizes differing by at most one."""
    r = rank() if r is None else r
    w = world_size() if world is None else world
    return n * r // w, n * (r + 1) // w


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of an epoch: the permutation :meth:`CTRData.batches` draws."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_batches(data: Any, split: str, batch_size: int, seed: int,
                  epoch: int) -> Iterator[tuple[dict[str, torch.Tensor], float, int]]:
    """This rank's ``(batch, loss weight, rows)`` of each global batch of an epoch (see the module
    docstring). ``rows`` is 0 for the placeholder row of a rank whose slice is empty (weight 0)."""
    order = epoch_order(data.split(split).n, seed, epoch)
    w = world_size()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        lo, hi = shard(len(rows), world=w)
        if hi > lo:
            yield data.batch(split, rows[lo:hi]), (hi - lo) * w / len(rows), hi - lo
        else:   # fewer rows than ranks: DDP needs every rank in every step
            yield data.batch(split, rows[:1]), 0.0, 0


def eval_rows(n: int) -> np.ndarray:
    """The row indices of a split of ``n`` rows this rank predicts (all of them with one process)."""
    if 0 < n < world_size():   # a rank without a row would hold no knowledge fields to gather
        raise DistributedError(f"a split of {n} samples cannot be shared by {world_size()} processes; "
                               f"use at most {n}")
    lo, hi = shard(n)
    return np.arange(lo, hi)


# ----------------------------------------------------------------------------- collectives
def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(x: np.ndarray) -> np.ndarray:
    """Every rank's ``x`` (rows of one shape and dtype) concatenated in rank order, on every rank.

    A padded ``all_gather`` of tensors (no pickling); the padding is cut off, so ranks holding
    :func:`shard` slices of a split get exactly the split back."""
    if world_size() == 1:
        return x
    x = np.ascontiguousarray(x)
    dev = _comm_device()
    n = torch.tensor([x.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    t = torch.from_numpy(x).to(dev)
    if t.shape[0] < max(counts):
        t = torch.cat([t, t.new_zeros((max(counts) - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(t) for _ in counts]
    dist.all_gather(parts, t)
    return np.concatenate([p[:c].cpu().numpy() for p, c in zip(parts, counts)])


def all_sum(values: dict[str, float]) -> dict[str, float]:
    """``values`` summed over the ranks (keys: the union; a key a rank lacks counts as 0)."""
    if world_size() == 1:
        return values
    every: list[Any] = [None] * world_size()
    dist.all_gather_object(every, values)
    out: dict[str, float] = {}
    for d in every:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return out


def broadcast_buffers(*modules: nn.Module) -> None:
    """Copy rank 0's buffers (e.g. Dice's running statistics) to every rank."""
    if world_size() == 1:
        return
    dev = _comm_device()
    for m in modules:
        for b in m.buffers():
            t = (b.to(torch.uint8) if b.dtype == torch.bool else b.detach()).to(dev)
            dist.broadcast(t, 0)
            with torch.no_grad():
                b.copy_(t.to(b.device, b.dtype))


def gather_rng_states(state: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The torch CPU RNG state of every rank (rank order), or every rank's ``state`` (a CPU
    generator's ``get_state()``), for rank 0 to save in ``last/``."""
    state = torch.get_rng_state() if state is None else state
    if world_size() == 1:
        return [state]
    dev = _comm_device()
    parts = [torch.empty_like(state, device=dev) for _ in range(world_size())]
    dist.all_gather(parts, state.to(dev))
    return [p.cpu() for p in parts]


def rank_seed(seed: int, r: int) -> int:
    """The torch seed of rank ``r > 0`` during training (dropout draws differ across ranks; rank 0
    keeps the run's own stream, so one process draws what it always drew)."""
    return int(np.random.SeedSequence([seed, r]).generate_state(1, np.uint64)[0] % (2**63))


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel when there are several ranks, else itself.

    ``find_unused_parameters``: a step need not reach every parameter (e.g. an embedding table a
    backbone does not read); such parameters keep no gradient on every rank, as with one process.
    Buffers are not broadcast at every forward (KAR's knowledge vectors are buffers):
    :func:`broadcast_buffers` syncs them once per epoch."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    kw: dict[str, Any] = {"find_unused_parameters": True}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:   # torch >= 2.13
        kw["forward_sync_buffers"] = False
    else:
        kw["broadcast_buffers"] = False
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, **kw)
