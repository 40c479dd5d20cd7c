"""Generation speed paths (issue 18): length bucketing, per-token progress, memory-sized batches, static cache.

Every path must give the one-prompt-at-a-time greedy texts, since cached KAR texts are keyed by what
produced them (LM, template, settings), not by the batching. The CUDA tests run on a GPU machine only
(benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import functools

import pytest
import torch

from cocorec.knowledge.lm import (
    CPU_AUTO_BATCH,
    LM,
    LMError,
    auto_batch_size,
    kv_bytes_per_token,
    load_lm,
)

# Lengths from 1 to ~120 characters, not in length order, with duplicates of a length.
PROMPTS = [
    "short",
    "a much longer prompt about a user who rated many movies: " + "Heat (1995), 5 stars; " * 3,
    "mid-sized prompt here",
    "x",
    "another mid prompt!!!",
    "a long one again, but shorter than the longest: " + "Alien (1979); " * 2,
    "tiny",
]


@pytest.fixture(scope="module")
def lm() -> LM:
    return load_lm("tiny")


def test_bucketed_batches_equal_one_at_a_time(lm: LM) -> None:
    single = [lm.generate([p], max_new_tokens=8, batch_size=1)[0] for p in PROMPTS]
    for bs in (2, 3, len(PROMPTS)):
        assert lm.generate(PROMPTS, max_new_tokens=8, batch_size=bs) == single
    assert len(set(single)) > 1  # distinct prompts give distinct texts: the comparison can fail


def test_generate_ids_restores_order_and_stops_at_eos(lm: LM) -> None:
    rows = [lm.prompt_ids([p])[0][0] for p in PROMPTS]
    new = lm.generate_ids(rows, max_new_tokens=6, batch_size=3)
    assert new == [lm.generate_ids([r], max_new_tokens=6)[0] for r in rows]
    eos = set(lm._eos_ids())
    assert all(len(r) <= 6 and not eos & set(r) for r in new)
    full = lm.generate_ids(rows, max_new_tokens=6, batch_size=3, stop_at_eos=False)
    assert all(len(r) == 6 for r in full)
    # where a row did not stop early, the forced run is the same text
    assert all(f == n for f, n in zip(full, new) if len(n) == 6)
    with pytest.raises(LMError, match="empty prompt"):
        lm.generate_ids([[1, 2], []])


def test_batches_are_neighbours_in_token_length(lm: LM) -> None:
    rows = [lm.prompt_ids([p])[0][0] for p in PROMPTS]
    seen: list[list[int]] = []
    lm.generate_ids(rows, max_new_tokens=2, batch_size=3, on_batch=lambda idx, new: seen.append(list(idx)))
    assert sorted(i for b in seen for i in b) == list(range(len(rows)))
    assert [len(b) for b in seen] == [3, 3, 1]
    lengths = [[len(rows[i]) for i in b] for b in seen]
    # longest first, and every batch holds a contiguous run of the sorted lengths
    flat = [n for b in lengths for n in b]
    assert flat == sorted(flat, reverse=True)


def test_on_batch_texts_and_per_token_progress(lm: LM) -> None:
    got: dict[int, str] = {}
    ticks: list[float] = []

    def on_batch(idx: list[int], texts: list[str]) -> None:
        got.update(zip(idx, texts))

    out = lm.generate(PROMPTS, max_new_tokens=8, batch_size=3, on_batch=on_batch, on_progress=ticks.append,
                      progress=True)
    assert [got[i] for i in range(len(PROMPTS))] == out
    assert sum(ticks) == pytest.approx(len(PROMPTS))
    # more updates than batches: the progress moves inside a batch, so the first batch has an estimate
    assert len(ticks) > 3 and all(t > 0 for t in ticks)


def test_kv_bytes_and_auto_batch_size() -> None:
    from transformers import LlamaConfig, Qwen2Config

    smol = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       intermediate_size=1536, vocab_size=49152)
    qwen = Qwen2Config(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       intermediate_size=8960, vocab_size=151936)
    assert kv_bytes_per_token(smol, 2) == 23_040 and kv_bytes_per_token(smol, 4) == 46_080  # RESULTS.md's figures
    assert kv_bytes_per_token(qwen, 2) == 28 * 2 * 2 * 128 * 2
    gib = 2**30
    small, big = auto_batch_size(qwen, 256, 96, 8 * gib), auto_batch_size(qwen, 256, 96, 64 * gib)
    assert 8 <= small < big <= 1024 and small % 8 == 0
    # what it picks fits: its KV alone stays within the free memory
    assert small * kv_bytes_per_token(qwen, 2) * (256 + 96) < 8 * gib
    assert auto_batch_size(qwen, 2048, 96, 8 * gib) < small  # longer prompts, fewer of them
    assert auto_batch_size(qwen, 256, 96, 1) == 1
    assert auto_batch_size(smol, 256, 96, 1000 * gib, max_batch=64) == 64


def test_resolve_batch_size_on_cpu(lm: LM) -> None:
    assert lm.resolve_batch_size("auto", 300, 64) == CPU_AUTO_BATCH
    assert lm.resolve_batch_size(None, 300, 64) == lm.batch_size
    assert lm.resolve_batch_size(5, 300, 64) == 5
    with pytest.raises(LMError, match="auto"):
        lm.resolve_batch_size("big", 300, 64)
    assert lm.generate(PROMPTS[:3], max_new_tokens=4, batch_size="auto") == lm.generate(PROMPTS[:3], max_new_tokens=4)


def test_static_cache_is_off_on_cpu(lm: LM, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []
    real = lm.model.generate

    def spy(**kw):
        seen.append(kw)
        return real(**kw)

    monkeypatch.setattr(lm.model, "generate", spy)
    out = lm.generate(PROMPTS[:3], max_new_tokens=4, static_cache=True)
    assert out == lm.generate(PROMPTS[:3], max_new_tokens=4)
    assert seen and all("cache_implementation" not in kw for kw in seen)


def test_knowledge_store_progress_and_cache_per_batch(lm: LM, tmp_path) -> None:
    from cocorec.knowledge.kar import KnowledgeStore

    calls: list[tuple[int, bool]] = []
    real = lm.generate

    @functools.wraps(real)  # the store reads generate's signature to pass on_progress
    def spy(prompts, **kw):
        calls.append((len(prompts), "on_progress" in kw))
        return real(prompts, **kw)

    store = KnowledgeStore(lm, "tiny", max_new_tokens=6, batch_size=3, root=tmp_path, progress=True)
    lm.generate = spy  # type: ignore[method-assign]
    try:
        out = store.generate("user", PROMPTS)
    finally:
        del lm.generate
    assert calls == [(3, True), (3, True), (1, True)]
    system = store.generation_settings()["system"]
    assert out == [lm.generate([p], max_new_tokens=6, system=system)[0] for p in PROMPTS]
    assert store.stats["user"] == {"generated": len(PROMPTS), "cached": 0}


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh)")


@cuda
def test_cuda_bucketed_and_static_equal_one_at_a_time() -> None:
    gpu = load_lm("tiny")
    gpu.model.to("cuda")
    gpu.device = torch.device("cuda")
    single = [gpu.generate([p], max_new_tokens=8, batch_size=1)[0] for p in PROMPTS]
    assert gpu.generate(PROMPTS, max_new_tokens=8, batch_size=3) == single
    assert gpu.generate(PROMPTS, max_new_tokens=8, batch_size="auto") == single
    assert gpu.generate(PROMPTS, max_new_tokens=8, batch_size=3, static_cache=True) == single
    cpu = load_lm("tiny")
    assert cpu.generate(PROMPTS, max_new_tokens=8, batch_size=3) == single  # the CPU's texts too


@cuda
def test_cuda_auto_batch_size_uses_free_memory() -> None:
    gpu = load_lm("tiny")
    gpu.model.to("cuda")
    gpu.device = torch.device("cuda")
    assert gpu.resolve_batch_size("auto", 256, 96) > CPU_AUTO_BATCH
