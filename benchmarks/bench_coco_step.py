"""Benchmark: a CoCo collaboration-phase training step with the cached user-text KV vs a full LM pass.

The step: L soft-prompt tokens per user (gradient to the prompts) through the LM, CoCo's read-out
(cross-attention over text + prompt hidden states) to k_u, a loss, backward. ``cached`` runs only
the L prompt positions after the user's cached text KV (:class:`cocorec.coco.kvcache.UserTextKVCache`);
``full`` runs text + prompt (what a contradiction step, or no cache, costs). Median of ``--steps``
timed steps after ``--warmup``. Also prints the KV-cache size per user and for every ml-100k user.

    python benchmarks/bench_coco_step.py                                    # 2-core CPU, SmolLM2, 16 x 256
    python benchmarks/bench_coco_step.py --device cuda --dtype bf16 --arch qwen2.5-1.5b --users 32 --tokens 512

``--arch smollm2`` uses the real SmolLM2-135M if it is installed (``--random`` forces a random model
of its shape); other archs are random-weight models built from a config (shapes only matter here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Shapes (transformers config kwargs). SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 KV heads.
ARCHS = {
    "smollm2": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                              intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                              tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                   max_position_embeddings=32768, tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                   max_position_embeddings=32768, tie_word_embeddings=True)),
}
ML100K_USERS = 943


def build_lm(arch: str, device: str, dtype: str, random: bool):
    from cocorec.knowledge.lm import LM, LMConfig, load_lm

    if arch == "smollm2" and not random:
        try:
            lm = load_lm(LMConfig("smollm2", device=device, dtype=dtype))
            return lm, "real SmolLM2-135M-Instruct"
        except Exception as e:  # not installed: its shape with random weights
            print(f"(real SmolLM2 unavailable: {str(e).splitlines()[0][:120]}; using a random model of its shape)")
    kind, kw = ARCHS[arch]
    if kind == "llama":
        from transformers import LlamaConfig as Config
    else:
        from transformers import Qwen2Config as Config
    cfg = Config(**kw)
    return LM.from_config(cfg, seed=0, device=device, dtype=dtype), f"random {arch} shape"


def ml100k_token_counts(lm) -> list[int] | None:
    """Token counts of the real ml-100k user texts with this LM's tokenizer (None if unavailable)."""
    try:
        from cocorec.data import prepare

        data = prepare("ml-100k")
    except Exception:
        return None
    if len(lm.tokenizer) < 1000:   # the tiny byte tokenizer of a random model says nothing about real counts
        return None
    return [len(lm.tokenizer(t)["input_ids"]) for t in data.user_text]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="smollm2", choices=sorted(ARCHS))
    ap.add_argument("--random", action="store_true", help="random weights even for smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="LM dtype: float32 | bf16")
    ap.add_argument("--kv-dtype", default=None, help="KV-cache storage dtype (default: bf16, CoCo's default)")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--skip-full", action="store_true", help="time the cached step only")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from cocorec.coco.kvcache import UserTextKVCache, kv_bytes_per_token
    from cocorec.coco.readout import CrossAttentionReadout

    dev = torch.device(args.device)
    lm, what = build_lm(args.arch, args.device, args.dtype, args.random)
    kv_dtype = args.kv_dtype or "bf16"
    g = torch.Generator().manual_seed(0)
    vocab = min(lm.model.get_input_embeddings().weight.shape[0], 30000)
    ids = torch.randint(100, vocab, (args.users, args.tokens), generator=g).tolist()
    storage = "device" if dev.type == "cuda" else "memory"
    cache = UserTextKVCache(lm, ids, dtype=kv_dtype, storage=storage, memory_limit_gb=1e9)
    users = torch.arange(args.users)
    t0 = time.perf_counter()
    cache.ensure(users)
    sync(dev)
    build_s = time.perf_counter() - t0

    readout = CrossAttentionReadout(lm.hidden_size, 32).to(dev)
    emb = lm.model.get_input_embeddings().weight
    prompts = torch.nn.Parameter(emb[torch.randint(100, vocab, (args.users * args.prompt_len,), generator=g).to(dev)]
                                 .detach().float().view(args.users, args.prompt_len, -1).clone())
    target = torch.randn(args.users, 32, generator=g).to(dev)

    def step(full: bool) -> float:
        prompts.grad = None
        readout.zero_grad(set_to_none=True)
        sync(dev)
        t = time.perf_counter()
        fn = cache.full_hidden if full else cache.suffix_hidden
        h_p, h_t, mask = fn(users, prompts)
        k = readout(h_p, h_t, mask)
        loss = (k.float() - target).pow(2).mean()
        loss.backward()
        sync(dev)
        return time.perf_counter() - t

    def timed(full: bool) -> float:
        for _ in range(args.warmup):
            step(full)
        return statistics.median(step(full) for _ in range(args.steps))

    with torch.no_grad():
        hc = cache.suffix_hidden(users[:4], prompts[:4])[0].float()
        hf = cache.full_hidden(users[:4], prompts[:4])[0].float()
    print(f"LM: {what} ({lm.identity}), device {dev}, dtype {args.dtype}, KV storage {kv_dtype}/{storage}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"step: {args.users} users x {args.tokens} tokens, {args.prompt_len} soft tokens, forward + backward, "
          f"median of {args.steps}")
    print(f"cached vs full last-layer hidden states of the prompt: max |diff| = {(hc - hf).abs().max().item():.3g}, "
          f"max |h| = {hf.abs().max().item():.3g} (LM {args.dtype}, KV stored as {kv_dtype})")
    print(f"cache build (forward over the text, once per user while LoRA is frozen): {build_s:.3f} s")
    cached = timed(False)
    print(f"cached KV step: {cached * 1e3:9.1f} ms")
    if not args.skip_full:
        full = timed(True)
        print(f"full pass step: {full * 1e3:9.1f} ms")
        print(f"speed-up: {full / cached:.1f}x")

    per_tok32 = kv_bytes_per_token(cache.n_layers, cache.n_kv_heads, cache.head_dim, 4)
    print(f"KV bytes per token (all {cache.n_layers} layers, {cache.n_kv_heads} KV heads x {cache.head_dim}): "
          f"{per_tok32} fp32 / {per_tok32 // 2} bf16; text hidden states add {lm.hidden_size * 4} / "
          f"{lm.hidden_size * 2}")
    print(f"KV per user at {args.tokens} tokens: {per_tok32 * args.tokens / 1e6:.2f} MB fp32, "
          f"{per_tok32 * args.tokens / 2e6:.2f} MB bf16")
    counts = ml100k_token_counts(lm)
    if counts:
        n_tok, src = sum(counts), f"real token counts (mean {sum(counts) / len(counts):.0f}, max {max(counts)})"
    else:
        n_tok, src = ML100K_USERS * args.tokens, f"assuming {args.tokens} tokens per user"
    print(f"KV for all {ML100K_USERS} ml-100k users ({src}): {per_tok32 * n_tok / 1e9:.2f} GB fp32, "
          f"{per_tok32 * n_tok / 2e9:.2f} GB bf16 (+ text hidden states {lm.hidden_size * 4 * n_tok / 1e9:.2f} / "
          f"{lm.hidden_size * 2 * n_tok / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
