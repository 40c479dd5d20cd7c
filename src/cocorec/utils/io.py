"""Atomic file IO and content keys, shared by every cache and checkpoint.

Everything a user may load is safetensors + JSON (never pickle), written to a
temporary file in the same directory and then renamed, so a killed process
leaves either the old file or the new one, never half of one.

Example:
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> atomic_write_json(os.path.join(d, "a.json"), {"x": 1})
    >>> read_json(os.path.join(d, "a.json"))
    {'x': 1}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def _tmp_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths and tuples so json.dumps accepts them."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def first_nonfinite(obj: Any, where: str = "") -> tuple[str, float] | None:
    """Where the first NaN/Infinity of a JSON-like object sits (``test.auc``, ``history[2].loss``) and its
    value, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (where or "the value", obj)
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            hit = first_nonfinite(v, f"{where}.{k}" if where else str(k))
            if hit:
                return hit
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            hit = first_nonfinite(v, f"{where}[{i}]")
            if hit:
                return hit
    return None


def strict_json_dumps(obj: Any, what: str = "JSON", **kwargs: Any) -> str:
    """``json.dumps(..., allow_nan=False)``: NaN/Infinity are not JSON, so they are never written.

    A non-finite number is a ValueError naming where it sits:

        >>> strict_json_dumps({"test": {"auc": float("nan")}}, "metrics.json")
        Traceback (most recent call last):
        ...
        ValueError: metrics.json: test.auc is nan, which is not valid JSON; nothing written
    """
    obj = to_jsonable(obj)
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        hit = first_nonfinite(obj)
        if hit is None:
            raise
        raise ValueError(f"{what}: {hit[0]} is {hit[1]}, which is not valid JSON; nothing written") from None


def nonfinite_to_none(obj: Any) -> Any:
    """Replace NaN/Infinity by None (JSON null) - for values that are legitimately undefined, e.g. the AUC
    of a group with one class. Headline metrics are checked instead (a NaN there is an error)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.floating):
        return nonfinite_to_none(float(obj))
    if isinstance(obj, Mapping):
        return {k: nonfinite_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nonfinite_to_none(v) for v in obj]
    if isinstance(obj, np.ndarray) and obj.dtype.kind == "f":
        return nonfinite_to_none(obj.tolist())
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write strict JSON atomically (NaN/Infinity refused with a message naming the key, see strict_json_dumps)."""
    atomic_write_text(path, strict_json_dumps(obj, str(path), indent=indent, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_safetensors_atomic(
    tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Save torch tensors (or numpy arrays) as safetensors atomically."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        first = next(iter(tensors.values()), None)
        if first is not None and isinstance(first, np.ndarray):
            from safetensors.numpy import save_file
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
        else:
            from safetensors.torch import save_file
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata=dict(metadata or {}))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written temporary directory into place (replacing an old one)."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + f".old-{os.getpid()}")
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def key_of(*parts: Any, length: int = 16) -> str:
    """A short stable hash of JSON-serialisable parts: the key of a cache entry."""
    blob = json.dumps(to_jsonable(parts), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    """Root of every on-disk cache: $COCOREC_CACHE or ~/.cache/cocorec."""
    return Path(os.environ.get("COCOREC_CACHE") or Path.home() / ".cache" / "cocorec")
