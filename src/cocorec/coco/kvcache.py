"""The per-user user-text KV cache of CoCo (docs/coco.md, "KV storage").

The soft prompt is a *suffix*: the keys/values of the user's text do not depend on it. While
LoRA is frozen they are computed once per user and reused, so a training step runs only the L
prompt positions through the LM (benchmarks/RESULTS.md: the cost against a full pass).

Storage is ragged (no padding): token-major arrays ``kv [n_tokens, layers, 2, kv_heads, head_dim]``
and ``hidden [n_tokens, hidden]`` (the last-layer hidden states of the text, which the read-out
attends over), user ``u`` owning rows ``offsets[u]:offsets[u+1]``. Backends: ``memory`` (CPU
tensor), ``device`` (on the LM's device, e.g. the GPU), ``disk`` (a memory-mapped file; the OS
page cache keeps what fits), ``auto`` (memory below ``memory_limit_gb``, else disk). ``dtype``
bf16 halves the bytes; the values are cast to the LM's dtype when a step reads them.

Each user's entry carries a *version* (the LoRA state it was computed with); :meth:`ensure`
recomputes only users whose version is stale or missing. Every step builds a fresh
``DynamicCache`` from freshly gathered tensors (a cache grows in place when the LM appends the
suffix; nothing saved is ever appended to, and nothing is deep-copied).

Sharing: the entries of the base LM (version :data:`BASE`: no adapters, or adapters that are
exactly zero) depend only on the LM, the token ids and the storage dtype. With ``shared_dir``
and disk storage they live in ``shared_dir/<key>/`` and later runs reuse them (a per-user
``built.npy`` flag, updated under ``flock`` after the data is flushed); entries of other
versions go to a per-run store that is allocated only when first needed and deleted with the
cache.

Right padding: a batch of users of different text lengths is right-padded; the attention mask
is 0 on the padding, so the suffix attends to the real tokens only, and position ids come from
the mask (the suffix continues at each user's own length), which makes the batched suffix pass
equal to each user's unpadded full pass.

Example (tiny random LM):
    >>> import torch
    >>> from cocorec.knowledge.lm import tiny_lm
    >>> lm = tiny_lm()
    >>> cache = UserTextKVCache.from_texts(lm, ["a user", "another, longer user text"], dtype="float32")
    >>> suffix = torch.randn(2, 3, lm.hidden_size)
    >>> h_prompt, h_text, mask = cache.suffix_hidden(torch.tensor([0, 1]), suffix)
    >>> full_prompt, _, _ = cache.full_hidden(torch.tensor([0, 1]), suffix)
    >>> torch.allclose(h_prompt, full_prompt, atol=1e-4)
    True
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cocorec.config import ConfigError
from cocorec.knowledge.lm import LM, cache_from_kv, kv_from_cache, resolve_dtype
from cocorec.utils.io import key_of
from cocorec.utils.progress import progress_bar

__all__ = ["BASE", "UserTextKVCache", "kv_bytes_per_token", "resolve_storage"]

_NP_OF = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


_PREFIX = "cocorec-kv-"
BASE = "base"          # the version name of the LM without adapters (or with adapters that are exactly zero)
BASE_VERSION_ID = 0


def _remove_orphans(parent: Path) -> None:
    """Delete cache directories left by processes that no longer run (e.g. a killed training run)."""
    for d in parent.glob(f"{_PREFIX}*-*"):
        try:
            pid = int(d.name[len(_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:   # alive, another user's
            pass


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, bytes_per_value: int = 4) -> int:
    """Bytes of keys + values of one token over all layers (SmolLM2: 30 x 2 x 3 x 64 x 4 = 46080).

    Example:
        >>> kv_bytes_per_token(30, 3, 64) * 256 / 1e6   # one SmolLM2 user of 256 tokens, fp32, MB
        11.79648
    """
    return n_layers * 2 * n_kv_heads * head_dim * bytes_per_value


def _storage_dtype(dtype: str | torch.dtype) -> torch.dtype:
    d = resolve_dtype(dtype, torch.device("cpu")) if isinstance(dtype, str) else dtype
    if d not in _NP_OF:
        raise ValueError(f"unsupported KV storage dtype {dtype!r}")
    return d


class _Store:
    """A token-major [n_tokens, width] array in memory, on a device, or memory-mapped on disk."""

    def __init__(self, n_tokens: int, width: int, dtype: torch.dtype, storage: str, device: torch.device,
                 directory: Path | None, name: str) -> None:
        self.dtype, self.storage, self.width = dtype, storage, width
        self.n_tokens = n_tokens
        if storage == "disk":
            assert directory is not None
            self.path = directory / f"{name}.bin"
            shape = (max(n_tokens, 1), width)
            mode = "r+" if self.path.is_file() and self.path.stat().st_size == int(np.prod(shape)) * np.dtype(
                _NP_OF[dtype]).itemsize else "w+"
            self.array: Any = np.memmap(self.path, dtype=_NP_OF[dtype], mode=mode, shape=shape)
        else:
            dev = device if storage == "device" else torch.device("cpu")
            self.array = torch.zeros((max(n_tokens, 1), width), dtype=dtype, device=dev)

    @property
    def nbytes(self) -> int:
        return self.n_tokens * self.width * torch.finfo(self.dtype).bits // 8

    def write_rows(self, rows: np.ndarray, values: torch.Tensor) -> None:
        """``array[rows] = values`` in one scatter (``values``: [len(rows), ...], any dtype and device)."""
        v = values.detach().to(self.dtype).reshape(len(rows), self.width)
        if self.storage == "disk":
            v = v.cpu()
            self.array[rows] = (v.view(torch.uint16) if self.dtype == torch.bfloat16 else v).numpy()
        else:
            self.array[torch.from_numpy(rows).to(self.array.device)] = v.to(self.array.device)

    def flush(self) -> None:
        if self.storage == "disk":
            self.array.flush()

    def read_rows(self, rows: np.ndarray) -> torch.Tensor:
        """``array[rows]`` in one gather (a copy; rows of any shape, the width appended)."""
        if self.storage == "disk":
            t = torch.from_numpy(np.asarray(self.array[rows]))
            return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t
        return self.array[torch.from_numpy(rows).to(self.array.device)]


class _Slot:
    """Stores for every user's text (kv + hidden) and the version each user's entry was computed with."""

    def __init__(self, cache: UserTextKVCache, storage: str, directory: Path | None) -> None:
        n_tok = int(cache.offsets[-1])
        self.kv = _Store(n_tok, cache.kv_width, cache.dtype, storage, cache.lm.device, directory, "kv")
        self.hidden = _Store(n_tok, cache.hidden_size, cache.dtype, storage, cache.lm.device, directory, "hidden") \
            if cache.keep_hidden else None
        self.version = np.full(cache.n_users, -1, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + (self.hidden.nbytes if self.hidden is not None else 0)

    def flush(self) -> None:
        self.kv.flush()
        if self.hidden is not None:
            self.hidden.flush()


class _SharedSlot(_Slot):
    """The base-LM (no adapter) slot on disk, shared by every run with the same LM, texts and dtype.

    ``built.npy`` marks finished users; it is read and updated under an exclusive ``flock``, and a
    user is marked only after its data is flushed, so concurrent runs only ever duplicate work.
    """

    def __init__(self, cache: UserTextKVCache, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._lock_path = directory / "lock"
        with self._locked():
            super().__init__(cache, "disk", directory)
        self.sync()

    def _locked(self) -> Any:
        import contextlib
        import fcntl

        @contextlib.contextmanager
        def cm() -> Any:
            with open(self._lock_path, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        return cm()

    def _flags(self) -> np.ndarray:
        f = self.directory / "built.npy"
        if f.is_file():
            try:
                flags = np.load(f)
                if flags.shape == self.version.shape:
                    return flags.astype(bool)
            except (ValueError, OSError, EOFError):
                pass
        return np.zeros(self.version.shape, dtype=bool)

    def sync(self) -> None:
        """Take over the users other runs finished meanwhile."""
        with self._locked():
            done = self._flags()
        self.version[done] = BASE_VERSION_ID

    def mark(self, users: Sequence[int]) -> None:
        self.flush()
        with self._locked():
            flags = self._flags()
            flags[list(users)] = True
            tmp = self.directory / f"built.{os.getpid()}.npy"
            np.save(tmp, flags)
            os.replace(tmp, self.directory / "built.npy")


STORAGES = ("auto", "memory", "device", "disk")


def resolve_storage(storage: str, total_bytes: int, memory_limit_gb: float, device: torch.device | str,
                    free_device_bytes: int | None = None) -> str:
    """Where a cache of ``total_bytes`` goes. ``auto``: on a CUDA device, the device itself while the
    cache takes at most half of its free memory (no copy per step, no disk); else host memory up to
    ``memory_limit_gb``; else a memory-mapped file.

    Example:
        >>> resolve_storage("auto", 10**9, 2.0, "cpu"), resolve_storage("auto", 3 * 10**9, 2.0, "cpu")
        ('memory', 'disk')
        >>> resolve_storage("auto", 20 * 10**9, 2.0, "cuda", free_device_bytes=100 * 10**9)
        'device'
    """
    if storage != "auto":
        return storage
    if torch.device(device).type == "cuda":
        free = torch.cuda.mem_get_info(torch.device(device))[0] if free_device_bytes is None else free_device_bytes
        if total_bytes <= free // 2:
            return "device"
    return "memory" if total_bytes <= memory_limit_gb * 1e9 else "disk"


@dataclass
class KVConfig:
    """The user-text cache's settings (config keys: ``--set method.kv_storage=disk``).

    Example:
        >>> KVConfig(kv_storage="disk").cache_kwargs()["storage"]
        'disk'
    """

    max_text_tokens: int = 384        # longer texts keep their head (profile) and their tail (recent history)
    kv_dtype: str = "bf16"            # storage dtype of the cached states
    kv_storage: str = "auto"          # memory, device, disk, or auto (resolve_storage: device on a GPU, memory, disk)
    kv_memory_limit_gb: float = 2.0
    kv_batch_tokens: int = 4096       # tokens per LM pass when building the cache
    kv_dir: str | None = None         # where disk storage goes (default: the temp dir)
    kv_shared: bool = True            # keep the base LM's cache across runs (content-addressed)

    def __post_init__(self) -> None:
        if self.kv_storage not in STORAGES:
            raise ConfigError(f"kv_storage must be one of {STORAGES} (got {self.kv_storage!r})")
        if self.max_text_tokens < 1 or self.kv_batch_tokens < 1 or self.kv_memory_limit_gb < 0:
            raise ConfigError("max_text_tokens and kv_batch_tokens must be >= 1, kv_memory_limit_gb >= 0")

    def cache_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`UserTextKVCache` (directory and shared dir are the caller's)."""
        return {"dtype": self.kv_dtype, "storage": self.kv_storage, "memory_limit_gb": self.kv_memory_limit_gb,
                "batch_tokens": self.kv_batch_tokens}


class UserTextKVCache:
    """KV cache + last-layer hidden states of every user's text, computed with the LM as it is now.

    ``token_ids[u]``: the LM token ids of user u's text. ``version`` arguments name the LM state
    (e.g. a LoRA fingerprint; :data:`BASE` for the LM without adapters): :meth:`ensure` recomputes
    users cached under another version. With ``shared_dir`` and disk storage, the :data:`BASE`
    entries live in ``shared_dir/<key>/`` (key: LM identity, token ids, dtype) and are reused by
    later runs; other versions go to a per-run store allocated when first needed.
    """

    def __init__(self, lm: LM, token_ids: Sequence[Sequence[int]], *, dtype: str | torch.dtype = "bf16",
                 storage: str = "auto", directory: str | Path | None = None, memory_limit_gb: float = 2.0,
                 keep_hidden: bool = True, batch_tokens: int = 4096, shared_dir: str | Path | None = None,
                 progress: bool | None = None) -> None:
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES} (got {storage!r})")
        self.lm = lm
        self.token_ids = [list(map(int, t)) for t in token_ids]
        if any(len(t) == 0 for t in self.token_ids):
            raise ValueError("every user text needs at least one token")
        self.lengths = np.array([len(t) for t in self.token_ids], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.dtype = _storage_dtype(dtype)
        self.keep_hidden = keep_hidden
        self.batch_tokens = batch_tokens
        self.progress = progress   # None: a bar with an ETA in a terminal, lines in a log; False: nothing
        # Shapes from a one-token pass (works for any architecture the LM runtime supports).
        with torch.no_grad():
            probe = lm.embed_tokens(torch.tensor([[self.token_ids[0][0]]], device=lm.device))
            _, c = lm.hidden_states(probe, return_cache=True)
        kv = kv_from_cache(c)
        self.n_layers = len(kv)
        _, self.n_kv_heads, _, self.head_dim = kv[0][0].shape
        self.hidden_size = lm.hidden_size
        self.kv_width = self.n_layers * 2 * self.n_kv_heads * self.head_dim
        n_tok = int(self.offsets[-1])
        total = n_tok * (self.kv_width + (self.hidden_size if keep_hidden else 0)) * torch.finfo(self.dtype).bits // 8
        chosen = resolve_storage(storage, total, memory_limit_gb, lm.device)
        # The base LM's entries depend on nothing a run changes: with disk storage, and with "auto" on a
        # CPU, they go to the shared store, so later runs on the same texts skip the build (minutes on a
        # CPU); on a GPU recomputing them costs less than reading them back.
        share = chosen == "disk" or (storage == "auto" and chosen == "memory")
        self.storage = storage = chosen
        self._directory = directory
        self.directory: Path | None = None
        self._run: _Slot | None = None
        self._shared: _SharedSlot | None = None
        self.shared_dir: Path | None = None
        if shared_dir is not None and share:
            import hashlib

            h = hashlib.sha256()
            h.update(self.lengths.tobytes())
            h.update(np.concatenate([np.asarray(t, dtype=np.int64) for t in self.token_ids]).tobytes())
            key = key_of("coco-kv-v1", lm.identity, h.hexdigest(), str(self.dtype), keep_hidden, self.kv_width)
            self.shared_dir = Path(shared_dir) / key
            self._shared = _SharedSlot(self, self.shared_dir)
        self._versions: dict[Any, int] = {BASE: BASE_VERSION_ID}
        self.build_seconds = 0.0
        self.users_built = 0

    def _run_slot(self) -> _Slot:
        if self._run is None:
            if self.storage == "disk":
                parent = Path(self._directory) if self._directory is not None else Path(tempfile.gettempdir())
                parent.mkdir(parents=True, exist_ok=True)
                _remove_orphans(parent)
                self.directory = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=parent))
                self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.directory), True)
            self._run = _Slot(self, self.storage, self.directory)
        return self._run

    def _slot(self, version: Any) -> _Slot:
        if version == BASE and self._shared is not None:
            return self._shared
        return self._run_slot()

    @classmethod
    def from_texts(cls, lm: LM, texts: Sequence[str], max_tokens: int | None = None, head_tokens: int = 32,
                   **kw: Any) -> UserTextKVCache:
        """Tokenize ``texts`` and cache them lazily (nothing runs through the LM until :meth:`ensure`).

        A text over ``max_tokens`` keeps its first ``head_tokens`` tokens (the profile line) and its
        last tokens (the most recent history); one warning gives the count.
        """
        limit = lm.max_context if max_tokens is None else min(max_tokens, lm.max_context)
        head = min(head_tokens, limit // 4)
        ids: list[list[int]] = []
        n_cut = 0
        for start in range(0, len(texts), 256):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # over-context texts: cut below the same way
                t, m = lm.encode_text(list(texts[start:start + 256]), max_length=10**9)
            for row, n in zip(t.cpu(), m.sum(1).cpu()):
                r = row[: int(n)].tolist()
                if len(r) > limit:
                    r = r[:head] + r[len(r) - (limit - head):]
                    n_cut += 1
                ids.append(r)
        if n_cut:
            warnings.warn(f"{n_cut} of {len(texts)} user texts exceed {limit} tokens; kept the first {head} "
                          f"and the last {limit - head} tokens of each", stacklevel=2)
        return cls(lm, ids, **kw)

    # ------------------------------------------------------------------ sizes
    @property
    def n_users(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        """Bytes of one full copy (every user's KV + hidden states) in the storage dtype."""
        return int(self.offsets[-1]) * (self.kv_width + (self.hidden_size if self.keep_hidden else 0)) \
            * torch.finfo(self.dtype).bits // 8

    @property
    def nbytes_allocated(self) -> int:
        """Bytes of the stores allocated so far (the shared base store and/or this run's store)."""
        return sum(s.nbytes for s in (self._shared, self._run) if s is not None)

    def bytes_per_user(self) -> float:
        return self.nbytes / max(self.n_users, 1)

    def _version_id(self, version: Any) -> int:
        if version not in self._versions:
            self._versions[version] = len(self._versions)
        return self._versions[version]

    # ------------------------------------------------------------------ building
    def _padded_ids(self, users: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        width = int(max(self.lengths[u] for u in users))
        pad = self.lm.tokenizer.pad_token_id or 0
        ids = torch.full((len(users), width), pad, dtype=torch.long)
        mask = torch.zeros((len(users), width), dtype=torch.long)
        for j, u in enumerate(users):
            n = int(self.lengths[u])
            ids[j, :n] = torch.tensor(self.token_ids[u])
            mask[j, :n] = 1
        return ids.to(self.lm.device), mask.to(self.lm.device)

    def _rows(self, users: Sequence[int]) -> np.ndarray:
        """The store rows of ``users``' tokens, user after user (the order of a row-major mask selection)."""
        return np.concatenate([np.arange(self.offsets[u], self.offsets[u + 1]) for u in users])

    @torch.no_grad()
    def ensure(self, users: Sequence[int] | torch.Tensor | np.ndarray, version: Any = BASE) -> int:
        """Compute the cache of ``users`` that are missing or stale; returns how many were computed."""
        vid = self._version_id(version)
        slot = self._slot(version)
        users = np.unique(np.asarray(users.cpu() if torch.is_tensor(users) else users, dtype=np.int64))
        todo = users[slot.version[users] != vid]
        if len(todo) and isinstance(slot, _SharedSlot):
            slot.sync()                         # another run may have built them meanwhile
            todo = users[slot.version[users] != vid]
        if len(todo) == 0:
            return 0
        t0 = time.perf_counter()
        todo = todo[np.argsort(-self.lengths[todo], kind="stable")]   # similar lengths share a batch
        # tokens, not users, measure the work: the longest texts come first, so a per-user ETA would lie
        bar = progress_bar(int(self.lengths[todo].sum()), f"user-text KV ({len(todo)} users)", "tok",
                           enabled=self.progress is not False and len(todo) >= 2, unit_scale=True)
        i = 0
        while i < len(todo):
            n = max(1, self.batch_tokens // int(self.lengths[todo[i]]))
            chunk = todo[i:i + n].tolist()
            i += n
            ids, mask = self._padded_ids(chunk)
            h, cache = self.lm.hidden_states(self.lm.embed_tokens(ids), mask, return_cache=True)
            # every layer's [b, kvh, T, hd] keys and values -> token-major [b, T, layers, 2, kvh, hd]:
            # one stack and one permuting copy, then one scatter of the real tokens into the ragged
            # store (no per-user, per-layer small copies: those dominated a GPU build)
            kv = torch.stack([t for k, v in kv_from_cache(cache) for t in (k, v)], 0)
            b, t = ids.shape
            kv = kv.view(self.n_layers, 2, b, self.n_kv_heads, t, self.head_dim).permute(2, 4, 0, 1, 3, 5)
            kv = torch.empty(kv.shape, dtype=self.dtype, device=kv.device).copy_(kv).view(b * t, self.kv_width)
            # the real tokens' positions in the [b * t] flattening, from the lengths (no device sync)
            real = torch.from_numpy(np.concatenate([j * t + np.arange(self.lengths[u])
                                                    for j, u in enumerate(chunk)])).to(kv.device)
            rows = self._rows(chunk)
            slot.kv.write_rows(rows, kv[real])
            if slot.hidden is not None:
                slot.hidden.write_rows(rows, h.reshape(b * t, -1)[real])
            slot.version[chunk] = vid
            if isinstance(slot, _SharedSlot):
                slot.mark(chunk)
            bar.update(int(self.lengths[chunk].sum()))
        bar.close()
        self.build_seconds += time.perf_counter() - t0
        self.users_built += len(todo)
        return len(todo)

    def invalidate(self) -> None:
        """Forget this run's entries (the shared base entries stay valid: the base LM never changes)."""
        if self._run is not None:
            self._run.version[:] = -1

    # ------------------------------------------------------------------ reading
    def gather(self, users: Sequence[int] | torch.Tensor, version: Any = BASE, dtype: torch.dtype | None = None
               ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None, torch.Tensor]:
        """Right-padded per-layer ``(key, value)`` [M, kv_heads, T, head_dim], text hidden [M, T, H], mask [M, T].

        Fresh tensors every call (safe to hand to a cache that appends in place).
        """
        users_np = np.asarray(users.cpu() if torch.is_tensor(users) else users, dtype=np.int64).reshape(-1)
        slot = self._slot(version)
        vid = self._version_id(version)
        if (slot.version[users_np] != vid).any():
            raise RuntimeError("gather() of users not built for this version; call ensure() first")
        dev = self.lm.device
        dtype = dtype or self.lm.dtype
        rows, real_t = self._padded_rows(users_np)
        m, width = rows.shape
        kv = slot.kv.read_rows(rows).to(dev, non_blocking=True).masked_fill_(~real_t[..., None], 0)
        # [m, width, layers, 2, kvh, hd] -> [layers, 2, m, kvh, width, hd] and the LM's dtype in one copy;
        # each layer's key and value are then contiguous views of one fresh tensor
        kv = kv.view(m, width, self.n_layers, 2, self.n_kv_heads, self.head_dim).permute(2, 3, 0, 4, 1, 5)
        kv = torch.empty(kv.shape, dtype=dtype, device=dev).copy_(kv)
        layers = [(kv[i, 0], kv[i, 1]) for i in range(self.n_layers)]
        hid = None
        if slot.hidden is not None:
            hid = slot.hidden.read_rows(rows).to(dev, non_blocking=True).masked_fill_(~real_t[..., None], 0).to(dtype)
        return layers, hid, real_t.long()

    def text_states(self, users: Sequence[int] | torch.Tensor, version: Any = BASE,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The text's last-layer hidden states ``[M, T, H]`` (right-padded, zeros on padding) and mask ``[M, T]``,
        without the keys and values (what a read-out over the text needs for users whose LM pass is not
        rerun)."""
        if not self.keep_hidden:
            raise RuntimeError("this cache keeps no hidden states (keep_hidden=False)")
        users_np = np.asarray(users.cpu() if torch.is_tensor(users) else users, dtype=np.int64).reshape(-1)
        self.ensure(users_np, version)
        rows, real_t = self._padded_rows(users_np)
        hid = self._slot(version).hidden.read_rows(rows).to(self.lm.device, non_blocking=True)
        return hid.masked_fill_(~real_t[..., None], 0).to(dtype or self.lm.dtype), real_t.long()

    def _padded_rows(self, users: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """Store rows ``[M, T]`` of each user's tokens, right-padded, and the mask of real tokens.

        Padding reads the user's first row (zeroed by the caller): one gather per store, no per-user copies.
        """
        lengths = self.lengths[users]
        steps = np.arange(int(lengths.max()))
        real = steps[None, :] < lengths[:, None]
        rows = self.offsets[users][:, None] + np.where(real, steps[None, :], 0)
        return rows, torch.from_numpy(real).to(self.lm.device)

    # ------------------------------------------------------------------ LM passes
    def suffix_hidden(self, users: Sequence[int] | torch.Tensor, suffix: torch.Tensor, version: Any = BASE
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Last-layer hidden states of the suffix after each user's cached text: ``(h_suffix [M, L, H], h_text, mask)``.

        Gradients flow into ``suffix`` (and into any adapter on the suffix path); the cached text
        is constant.
        """
        self.ensure(users, version)
        layers, h_text, mask = self.gather(users, version)
        cache = cache_from_kv(layers)
        m, n = suffix.shape[:2]
        attn = torch.cat([mask, torch.ones((m, n), dtype=mask.dtype, device=mask.device)], 1)
        h = self.lm.hidden_states(suffix, attn, cache)
        return h, h_text, mask

    def full_hidden(self, users: Sequence[int] | torch.Tensor, suffix: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same as :meth:`suffix_hidden` by one full pass over text + suffix (gradients reach every adapter)."""
        users = [int(u) for u in (users.tolist() if torch.is_tensor(users) else users)]
        ids, mask = self._padded_ids(users)
        m, n = suffix.shape[:2]
        x = torch.cat([self.lm.embed_tokens(ids).to(suffix.dtype), suffix.to(self.lm.device)], 1)
        attn = torch.cat([mask, torch.ones((m, n), dtype=mask.dtype, device=mask.device)], 1)
        h = self.lm.hidden_states(x, attn)
        t = ids.shape[1]
        return h[:, t:], h[:, :t], mask
