"""Persistent, resumable on-disk caches for LM text and vectors.

A cache lives in ``<root>/<namespace_key>/``, one directory per namespace key, where the key is
``key_of(...)`` over everything that decides the content (LM identity, prompt template, generation
settings, encoder identity...). A different LM or prompt therefore lands in a different directory
and a stale cache is never reused. ``meta.json`` records the key (checked on open) and free-form
metadata for humans.

Every ``put_many`` writes one new shard file atomically (temporary file + ``os.replace``), so a run
killed half-way keeps every batch flushed before the kill, and the next run only computes
``missing(keys)``.

The atomic file helpers live in :mod:`cocorec.utils.io` and are re-exported here for convenience.

Example:
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> ns = key_of("lm:tiny", "prompt v1", {"max_new_tokens": 8})
    >>> tc = TextCache(root, ns, meta={"what": "demo"})
    >>> tc.missing(["a", "b"])
    ['a', 'b']
    >>> tc.put_many({"a": "first"})
    >>> TextCache(root, ns).missing(["a", "b"])   # reopened: "a" survived
    ['b']
    >>> vc = VectorCache(root, key_of("enc", 1))
    >>> vc.put_many({"u1": [1.0, 2.0], "u2": [3.0, 4.0]})
    >>> vc.get_matrix(["u2", "u1"]).tolist()
    [[3.0, 4.0], [1.0, 2.0]]
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cocorec.utils.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cache_root,
    file_sha256,
    key_of,
    read_json,
    save_safetensors_atomic,
    to_jsonable,
)

__all__ = [
    "CacheError",
    "TextCache",
    "VectorCache",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cache_root",
    "file_sha256",
    "key_of",
    "read_json",
    "save_safetensors_atomic",
]

from cocorec.errors import InputError, one_line

_FORMAT = 1
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class CacheError(InputError):
    """A cache directory that cannot be used (wrong namespace key, wrong kind, bad name)."""


def _shard_name(suffix: str) -> str:
    # Time first so that a lexical sort is the write order (later shards win on duplicate keys);
    # pid + random so that concurrent writers never pick the same name.
    return f"shard-{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


class _ShardedCache:
    """Common part: namespace directory, meta.json check, shard listing."""

    kind = "abstract"
    suffix = ""

    def __init__(self, root: str | os.PathLike, namespace_key: str, meta: Mapping[str, Any] | None = None):
        if not isinstance(namespace_key, str) or not _SAFE_KEY.match(namespace_key):
            raise CacheError(f"namespace key must be a short file-safe string, got {namespace_key!r}")
        self.key = namespace_key
        self.dir = Path(root) / namespace_key
        meta_path = self.dir / "meta.json"
        stored = self._read_meta(meta_path) if meta_path.exists() else None
        if stored is not None:
            if stored.get("key") != namespace_key or stored.get("kind") != self.kind:
                raise CacheError(
                    f"{self.dir}: meta.json says key={stored.get('key')!r} kind={stored.get('kind')!r}, "
                    f"expected key={namespace_key!r} kind={self.kind!r}; refusing to reuse a stale cache "
                    f"(clear it with: rm -r {self.dir})"
                )
            self.meta: dict[str, Any] = dict(stored.get("meta") or {})
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.meta = dict(to_jsonable(dict(meta or {})))
            atomic_write_json(
                meta_path,
                {"key": namespace_key, "kind": self.kind, "format": _FORMAT, "meta": self.meta,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            )
        self.refresh()

    def _read_meta(self, meta_path: Path) -> dict[str, Any] | None:
        """The stored meta.json, or None if it is unreadable (truncated, not JSON, not an object): it is then
        rebuilt, since the directory's name is the namespace key and the shards carry their own content. Shards
        of another kind of cache in the directory cannot be told apart that way: a CacheError with the command
        that clears the directory."""
        try:
            stored = read_json(meta_path)
            if isinstance(stored, dict):
                return stored
            why = f"a JSON {type(stored).__name__}, not an object"
        except (OSError, ValueError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
            why = one_line(e, 120)
        other = [p.name for p in self.dir.glob("shard-*") if not p.name.endswith(self.suffix)]
        if other:
            raise CacheError(f"{meta_path}: unreadable ({why}) and the directory holds shards of another kind "
                             f"(e.g. {other[0]}); clear it with: rm -r {self.dir}")
        warnings.warn(f"{meta_path}: unreadable ({why}); rebuilt it (the directory's name is the namespace key; "
                      f"its {len(self._shards())} shard(s) are kept)", stacklevel=3)
        return None

    def _shards(self) -> list[Path]:
        # Temporary files start with "." (see cocorec.utils.io), so they never match.
        return sorted(self.dir.glob(f"shard-*{self.suffix}"))

    def refresh(self) -> None:
        """Reload every shard from disk (e.g. after another process added some)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._index())

    def __contains__(self, key: object) -> bool:
        return key in self._index()

    def keys(self) -> list[str]:
        return list(self._index())

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Keys not in the cache, in first-seen order, without duplicates."""
        index = self._index()
        out: dict[str, None] = {}
        for k in keys:
            if k not in index:
                out.setdefault(k, None)
        return list(out)

    def _index(self) -> Mapping[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.dir)!r}, entries={len(self)})"


class TextCache(_ShardedCache):
    """Persistent ``str -> str`` map stored as atomically written JSON shards.

    Example:
        >>> import tempfile
        >>> tc = TextCache(tempfile.mkdtemp(), key_of("x"))
        >>> tc.put_many({"k": "v"}); tc.get("k"), "k" in tc, tc.get("nope")
        ('v', True, None)
    """

    kind = "text"
    suffix = ".json"

    def refresh(self) -> None:
        self._data: dict[str, str] = {}
        for shard in self._shards():
            try:
                part = json.loads(shard.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:  # never expected (atomic writes); recompute rather than crash
                warnings.warn(f"skipping unreadable cache shard {shard}: {e}", stacklevel=2)
                continue
            self._data.update(part)

    def _index(self) -> Mapping[str, str]:
        return self._data

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._data.get(key, default)

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def items(self) -> list[tuple[str, str]]:
        return list(self._data.items())

    def put_many(self, items: Mapping[str, str]) -> None:
        """Add entries and flush them to a new shard at once (one atomic file)."""
        new = {str(k): v for k, v in items.items() if self._data.get(str(k)) != v}
        for k, v in new.items():
            if not isinstance(v, str):
                raise TypeError(f"TextCache values must be str, got {type(v).__name__} for key {k!r}")
        if not new:
            return
        atomic_write_text(self.dir / _shard_name(self.suffix), json.dumps(new, ensure_ascii=False))
        self._data.update(new)

    def put(self, key: str, value: str) -> None:
        self.put_many({key: value})

    def compact(self) -> None:
        """Merge all shards into one (the merged shard is written before the old ones go)."""
        old = self._shards()
        if len(old) <= 1:
            return
        self.refresh()
        atomic_write_text(self.dir / _shard_name(self.suffix), json.dumps(self._data, ensure_ascii=False))
        for p in old:
            p.unlink(missing_ok=True)


class VectorCache(_ShardedCache):
    """Persistent ``id -> vector`` map stored as atomically written safetensors shards.

    Each shard holds a ``vectors`` matrix; its row ids are the JSON list in the shard's
    safetensors metadata (``ids``), so ids and rows are written in one atomic file and cannot
    disagree. All vectors share one shape and are stored as ``dtype`` (float32 by default).

    Example:
        >>> import tempfile
        >>> vc = VectorCache(tempfile.mkdtemp(), key_of("enc"))
        >>> vc.put_many({"a": np.ones(3)}); vc.get_matrix(["a"]).shape
        (1, 3)
    """

    kind = "vector"
    suffix = ".safetensors"

    def __init__(
        self,
        root: str | os.PathLike,
        namespace_key: str,
        meta: Mapping[str, Any] | None = None,
        dtype: np.dtype | type = np.float32,
    ):
        self.dtype = np.dtype(dtype)
        super().__init__(root, namespace_key, meta)

    def refresh(self) -> None:
        from safetensors import safe_open

        self._blocks: list[np.ndarray] = []
        self._where: dict[str, tuple[int, int]] = {}
        for shard in self._shards():
            try:
                with safe_open(str(shard), framework="np") as f:
                    ids = json.loads((f.metadata() or {})["ids"])
                    block = f.get_tensor("vectors")
            except Exception as e:  # never expected (atomic writes); recompute rather than crash
                warnings.warn(f"skipping unreadable cache shard {shard}: {e}", stacklevel=2)
                continue
            self._add_block(ids, block)

    def _add_block(self, ids: Sequence[str], block: np.ndarray) -> None:
        if len(ids) != block.shape[0]:
            raise CacheError(f"{self.dir}: shard with {len(ids)} ids but {block.shape[0]} rows")
        b = len(self._blocks)
        self._blocks.append(block)
        for row, i in enumerate(ids):
            self._where[i] = (b, row)

    def _index(self) -> Mapping[str, tuple[int, int]]:
        return self._where

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Shape of one vector, or None while the cache is empty."""
        return tuple(self._blocks[0].shape[1:]) if self._blocks else None

    def get(self, key: str) -> np.ndarray | None:
        loc = self._where.get(key)
        return None if loc is None else self._blocks[loc[0]][loc[1]]

    def put_many(self, items: Mapping[str, Any]) -> None:
        """Add vectors and flush them to a new shard at once (one atomic file)."""
        if not items:
            return
        ids = [str(k) for k in items]
        block = np.stack([np.asarray(v, dtype=self.dtype) for v in items.values()])
        self.put_matrix(ids, block)

    def put_matrix(self, ids: Sequence[str], matrix: np.ndarray) -> None:
        """Add rows ``matrix[j]`` under ``ids[j]`` (one shard)."""
        ids = [str(i) for i in ids]
        block = np.ascontiguousarray(np.asarray(matrix, dtype=self.dtype))
        if block.ndim < 1 or block.shape[0] != len(ids):
            raise ValueError(f"put_matrix: {len(ids)} ids but matrix shape {block.shape}")
        if len(set(ids)) != len(ids):
            raise ValueError("put_matrix: duplicate ids")
        if not ids:
            return
        if self.shape is not None and tuple(block.shape[1:]) != self.shape:
            raise ValueError(f"vector shape {tuple(block.shape[1:])} differs from the cache's {self.shape}")
        save_safetensors_atomic({"vectors": block}, self.dir / _shard_name(self.suffix),
                                metadata={"ids": json.dumps(ids, ensure_ascii=False)})
        self._add_block(ids, block)

    def get_matrix(self, ids: Sequence[str]) -> np.ndarray:
        """Stack the vectors of ``ids`` (in that order); KeyError naming the first missing ids."""
        absent = [i for i in ids if i not in self._where]
        if absent:
            raise KeyError(f"{len(absent)} ids not in {self.dir}, e.g. {absent[:3]}")
        if not ids:
            return np.zeros((0, *(self.shape or (0,))), dtype=self.dtype)
        return np.stack([self._blocks[b][r] for b, r in (self._where[i] for i in ids)])

    def compact(self) -> None:
        """Merge all shards into one (the merged shard is written before the old ones go)."""
        old = self._shards()
        if len(old) <= 1:
            return
        self.refresh()
        ids = list(self._where)
        merged = self.get_matrix(ids)
        save_safetensors_atomic({"vectors": merged}, self.dir / _shard_name(self.suffix),
                                metadata={"ids": json.dumps(ids, ensure_ascii=False)})
        for p in old:
            p.unlink(missing_ok=True)
        self.refresh()
