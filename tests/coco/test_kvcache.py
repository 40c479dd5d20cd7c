"""The suffix KV-cache path equals the full LM pass (hidden states and gradients), with padding."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from cocorec.coco.kvcache import UserTextKVCache, kv_bytes_per_token
from cocorec.knowledge.lm import tiny_lm

TEXTS = ["short user", "a much longer user text, with many more tokens than the first one has",
         "medium length text here", "x"]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(seed=0)


def _unpadded_full(lm, ids: list[int], suffix: torch.Tensor) -> torch.Tensor:
    x = torch.cat([lm.embed_tokens(torch.tensor([ids])), suffix[None]], 1)
    return lm.hidden_states(x)[0, len(ids):]


def test_suffix_path_equals_full_pass_with_padding(lm):
    cache = UserTextKVCache.from_texts(lm, TEXTS, dtype="float32", storage="memory")
    assert len(set(cache.lengths.tolist())) == len(TEXTS)           # different lengths: padding in the batch
    users = torch.tensor([3, 1, 0, 2])
    suffix = torch.randn(4, 5, lm.hidden_size, generator=torch.Generator().manual_seed(0))
    h_cached, h_text, mask = cache.suffix_hidden(users, suffix)
    h_full, h_text_full, mask_full = cache.full_hidden(users, suffix)
    assert_close(h_cached, h_full, atol=1e-5, rtol=1e-5)
    assert torch.equal(mask, mask_full)
    m = mask.bool()
    assert_close(h_text[m], h_text_full[m], atol=1e-5, rtol=1e-5)
    for j, u in enumerate(users.tolist()):                            # each row = its user alone, unpadded
        assert_close(h_cached[j], _unpadded_full(lm, cache.token_ids[u], suffix[j]), atol=1e-5, rtol=1e-5)
    # A second step from the same cache gives the same result (the saved KV was not appended to).
    again, _, _ = cache.suffix_hidden(users, suffix)
    assert_close(again, h_cached)


def test_suffix_gradients_equal_full_pass(lm):
    cache = UserTextKVCache.from_texts(lm, TEXTS, dtype="float32")
    users = torch.tensor([0, 1, 2])
    base = torch.randn(3, 4, lm.hidden_size, generator=torch.Generator().manual_seed(1))
    w = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (cache.suffix_hidden, cache.full_hidden):
        s = base.clone().requires_grad_(True)
        (fn(users, s)[0] @ w).pow(2).sum().backward()
        grads.append(s.grad)
    assert grads[0].abs().max() > 1e-4
    assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_disk_and_bf16_storage(lm, tmp_path):
    mem = UserTextKVCache.from_texts(lm, TEXTS, dtype="float32", storage="memory")
    disk = UserTextKVCache.from_texts(lm, TEXTS, dtype="float32", storage="disk", directory=tmp_path)
    bf16 = UserTextKVCache.from_texts(lm, TEXTS, dtype="bf16", storage="disk", directory=tmp_path)
    users = torch.tensor([1, 3])
    suffix = torch.randn(2, 3, lm.hidden_size)
    ref = mem.suffix_hidden(users, suffix)[0]
    assert_close(disk.suffix_hidden(users, suffix)[0], ref)
    assert_close(bf16.suffix_hidden(users, suffix)[0], ref, atol=0.1, rtol=0.05)
    assert bf16.nbytes * 2 == mem.nbytes
    assert disk.storage == "disk" and any(tmp_path.rglob("kv.bin"))


def test_versions_rebuild_only_stale_users(lm):
    cache = UserTextKVCache.from_texts(lm, TEXTS, dtype="float32")
    with pytest.raises(RuntimeError):
        cache.gather([0])
    assert cache.ensure([0, 1], version="a") == 2
    assert cache.ensure([0, 1, 2], version="a") == 1
    assert cache.ensure([1], version="b") == 1      # the LM changed: recomputed
    assert cache.users_built == 4


def test_a_build_shows_its_progress_in_tokens_with_an_eta_in_a_log_too(lm, capsys):
    # stderr is not a terminal here, as in a logged run: whole lines, not a bar nor silence
    cache = UserTextKVCache.from_texts(lm, TEXTS, dtype="float32", batch_tokens=16)
    cache.ensure(range(len(TEXTS)))
    err = capsys.readouterr().err
    tokens = int(cache.lengths.sum())
    last = err.splitlines()[-1]
    assert last.startswith(f"user-text KV ({len(TEXTS)} users): 100% {tokens}/{tokens} tok [") and "<" in last
    assert "\r" not in err
    UserTextKVCache.from_texts(lm, TEXTS, dtype="float32", progress=False).ensure(range(len(TEXTS)))
    assert capsys.readouterr().err == ""


def test_bytes_per_token_matches_design():
    # DESIGN 7: ~11.8 MB per SmolLM2 user at 256 tokens in fp32.
    assert kv_bytes_per_token(30, 3, 64, 4) * 256 == 11_796_480


def test_long_texts_keep_head_and_tail(lm):
    text = "PROFILE LINE; " + "history item; " * 20 + "most recent"
    with pytest.warns(UserWarning, match="1 of 2 user texts exceed 24 tokens"):
        cache = UserTextKVCache.from_texts(lm, [text, "short"], max_tokens=24, head_tokens=8)
    full, _ = lm.encode_text([text], max_length=10**6)
    full = full[0].tolist()
    assert cache.token_ids[0] == full[:6] + full[-18:]     # head = min(8, 24 // 4) = 6
    assert cache.lengths.tolist() == [24, len(lm.encode_text(["short"])[0][0])]


def test_base_entries_are_shared_across_runs(lm, tmp_path):
    kw = dict(dtype="float32", storage="disk", directory=tmp_path / "run", shared_dir=tmp_path / "shared")
    first = UserTextKVCache.from_texts(lm, TEXTS, **kw)
    users = torch.tensor([0, 2])
    suffix = torch.randn(2, 3, lm.hidden_size)
    ref = first.suffix_hidden(users, suffix)[0]
    assert first.users_built == 2 and first.nbytes_allocated == first.nbytes   # no per-run store yet
    second = UserTextKVCache.from_texts(lm, TEXTS, **kw)                        # a later run
    assert second.ensure([0, 1, 2]) == 1                                       # only user 1 is new
    assert_close(second.suffix_hidden(users, suffix)[0], ref)
    # Another LM version (adapters changed) goes to a per-run store; the shared base stays intact.
    assert second.ensure([0], version=("lora", 1.0)) == 1
    assert second.nbytes_allocated == 2 * second.nbytes
    assert UserTextKVCache.from_texts(lm, TEXTS, **kw).ensure([0, 1, 2]) == 0


def test_auto_storage_on_a_cpu_keeps_the_base_entries_for_later_runs(lm, tmp_path):
    kw = dict(dtype="float32", shared_dir=tmp_path / "shared")
    first = UserTextKVCache.from_texts(lm, TEXTS, storage="auto", **kw)
    assert first.storage == "memory" and first.shared_dir is not None
    assert first.ensure(range(len(TEXTS))) == len(TEXTS)
    later = UserTextKVCache.from_texts(lm, TEXTS, storage="auto", **kw)
    assert later.ensure(range(len(TEXTS))) == 0                         # read back, not rebuilt
    ram = UserTextKVCache.from_texts(lm, TEXTS, storage="memory", **kw)  # memory asked for: no disk at all
    assert ram.shared_dir is None and ram.ensure(range(len(TEXTS))) == len(TEXTS)
    users, suffix = torch.tensor([3, 1]), torch.randn(2, 3, lm.hidden_size)
    assert torch.equal(later.suffix_hidden(users, suffix)[0], ram.suffix_hidden(users, suffix)[0])
    # an adapted LM's entries stay in this run's memory
    assert later.ensure([0], version=("lora", 1.0)) == 1 and later.directory is None


@pytest.mark.parametrize("storage,dtype", [("memory", "float32"), ("disk", "float32"), ("disk", "bf16")])
def test_gather_returns_each_users_own_kv_and_zero_padding(lm, tmp_path, storage, dtype):
    """The one-scatter build and one-gather read put every token where the LM's own cache has it."""
    from cocorec.knowledge.lm import kv_from_cache

    cache = UserTextKVCache.from_texts(lm, TEXTS, dtype=dtype, storage=storage, directory=tmp_path)
    users = [2, 0, 3, 1]                          # not in offset order, lengths all different
    cache.ensure(users)
    layers, h_text, mask = cache.gather(users, dtype=torch.float32)
    tol = dict(atol=0.05, rtol=0.02) if dtype == "bf16" else dict(atol=1e-5, rtol=1e-5)
    assert mask.sum(1).tolist() == [int(cache.lengths[u]) for u in users]
    for j, u in enumerate(users):
        n = int(cache.lengths[u])
        h_alone, c = lm.hidden_states(lm.embed_tokens(torch.tensor([cache.token_ids[u]])), return_cache=True)
        for (k, v), (k_ref, v_ref) in zip(layers, kv_from_cache(c)):
            assert_close(k[j, :, :n], k_ref[0], **tol)
            assert_close(v[j, :, :n], v_ref[0], **tol)
            assert k[j, :, n:].abs().sum() == 0 and v[j, :, n:].abs().sum() == 0
        assert_close(h_text[j, :n], h_alone[0].detach(), **tol)
        assert h_text[j, n:].abs().sum() == 0
