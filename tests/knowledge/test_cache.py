"""On-disk caches: hits, misses, resume after a partial run, stale keys, vectors round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cocorec.knowledge.cache import (
    CacheError,
    TextCache,
    VectorCache,
    atomic_write_json,
    cache_root,
    key_of,
    read_json,
    save_safetensors_atomic,
)


def test_key_of_is_canonical() -> None:
    a = key_of("lm:x@float32", "template v1", {"max_new_tokens": 8, "batch": 16})
    assert a == key_of("lm:x@float32", "template v1", {"batch": 16, "max_new_tokens": 8})  # dict order
    assert a != key_of("lm:y@float32", "template v1", {"max_new_tokens": 8, "batch": 16})
    assert a != key_of("template v1", "lm:x@float32", {"max_new_tokens": 8, "batch": 16})


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COCOREC_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("COCOREC_CACHE")
    assert cache_root() == Path.home() / ".cache" / "cocorec"


def test_text_cache_hit_miss_and_resume(tmp_path: Path) -> None:
    ns = key_of("lm", "prompt")
    tc = TextCache(tmp_path, ns, meta={"lm": "tiny", "n": 3})
    keys = ["u1", "u2", "u3", "u1"]
    assert tc.missing(keys) == ["u1", "u2", "u3"]
    tc.put_many({"u1": "likes noir"})  # flushed at once: a kill after this keeps u1
    del tc
    resumed = TextCache(tmp_path, ns)
    assert resumed.meta == {"lm": "tiny", "n": 3}
    assert "u1" in resumed and resumed.get("u1") == "likes noir" and resumed["u1"] == "likes noir"
    assert resumed.get("u2") is None and "u2" not in resumed
    assert resumed.missing(keys) == ["u2", "u3"]
    resumed.put_many({"u2": "b", "u3": "ç ★"})
    resumed.put("u1", "updated")  # later shards win
    again = TextCache(tmp_path, ns)
    assert again.missing(keys) == [] and len(again) == 3
    assert again["u1"] == "updated" and again["u3"] == "ç ★"
    again.compact()
    assert len(list(again.dir.glob("shard-*"))) == 1
    assert dict(TextCache(tmp_path, ns).items()) == {"u1": "updated", "u2": "b", "u3": "ç ★"}
    with pytest.raises(TypeError):
        again.put_many({"u4": 5})  # type: ignore[dict-item]


def test_text_cache_ignores_leftover_temp_files(tmp_path: Path) -> None:
    tc = TextCache(tmp_path, "k1")
    tc.put_many({"a": "1"})
    (tc.dir / ".shard-0000.json.abc.tmp").write_text('{"b": "half-writ')  # a killed writer's leftover
    assert TextCache(tmp_path, "k1").missing(["a", "b"]) == ["b"]


def test_stale_key_never_reused(tmp_path: Path) -> None:
    old = TextCache(tmp_path, key_of("lm-A", "prompt"))
    old.put_many({"u1": "from A"})
    new = TextCache(tmp_path, key_of("lm-B", "prompt"))
    assert new.dir != old.dir and new.missing(["u1"]) == ["u1"]
    # A directory whose meta.json names another key (copied or renamed by hand) is refused.
    meta = read_json(old.dir / "meta.json")
    meta["key"] = "something-else"
    atomic_write_json(old.dir / "meta.json", meta)
    with pytest.raises(CacheError, match="stale"):
        TextCache(tmp_path, old.key)
    with pytest.raises(CacheError, match="stale"):
        VectorCache(tmp_path, new.key)  # a text cache is not a vector cache
    with pytest.raises(CacheError):
        TextCache(tmp_path, "../escape")


def test_vector_cache_round_trip(tmp_path: Path) -> None:
    ns = key_of("minilm", "mean")
    vc = VectorCache(tmp_path, ns, meta={"dim": 3})
    assert vc.shape is None and vc.missing(["a"]) == ["a"]
    vc.put_many({"a": [1, 2, 3], "b": np.array([4.0, 5.0, 6.0])})
    vc.put_matrix(["c", "d"], np.arange(6, dtype=np.float64).reshape(2, 3))
    reopened = VectorCache(tmp_path, ns)
    assert reopened.shape == (3,) and len(reopened) == 4
    m = reopened.get_matrix(["d", "a", "c"])
    assert m.dtype == np.float32
    np.testing.assert_array_equal(m, [[3, 4, 5], [1, 2, 3], [0, 1, 2]])
    np.testing.assert_array_equal(reopened.get("b"), [4, 5, 6])
    assert reopened.get("zz") is None
    with pytest.raises(KeyError, match="1 ids not in"):
        reopened.get_matrix(["a", "zz"])
    with pytest.raises(ValueError, match="shape"):
        reopened.put_many({"e": [1.0, 2.0]})
    with pytest.raises(ValueError, match="duplicate"):
        reopened.put_matrix(["x", "x"], np.zeros((2, 3)))
    reopened.put_many({"a": [9, 9, 9]})  # overwrite: later shard wins
    reopened.compact()
    final = VectorCache(tmp_path, ns)
    assert len(list(final.dir.glob("shard-*"))) == 1
    np.testing.assert_array_equal(final.get_matrix(["a", "d"]), [[9, 9, 9], [3, 4, 5]])
    assert final.get_matrix([]).shape == (0, 3)


def test_save_safetensors_atomic_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    p = tmp_path / "x.safetensors"
    save_safetensors_atomic({"w": np.ones((2, 2), dtype=np.float32)}, p, metadata={"ids": json.dumps(["a"])})
    with safe_open(str(p), framework="np") as f:
        assert json.loads(f.metadata()["ids"]) == ["a"]
        np.testing.assert_array_equal(f.get_tensor("w"), np.ones((2, 2)))
    assert [q.name for q in tmp_path.iterdir()] == ["x.safetensors"]  # no temp file left
