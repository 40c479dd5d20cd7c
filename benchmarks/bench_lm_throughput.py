"""LM throughput of knowledge extraction: CoCo's suffix step vs a bare forward pass, and generation.

For each LM shape (random weights from a config: no files, no network):

* **bare forward**: the decoder (no LM head) over B users x (T text + L prompt) tokens, no cache.
* **raw suffix step**: a raw Hugging Face decoder forward of the L = 8 prompt positions with a fresh
  ``DynamicCache`` of the saved per-layer key/values of the user text (the keyword, ``cache`` on
  transformers 5.24 or ``past_key_values`` on 5.17, is read from the forward signature): the LM
  compute of the suffix trick alone.
* **coco extraction**: CoCo's suffix step as the package runs it,
  ``cocorec.coco.kvcache.UserTextKVCache.suffix_hidden`` (gather from the ragged store + fresh cache +
  suffix pass); when that module is not importable, the raw suffix step stands in (the output says so).
  "eff tok/s" counts the B x (T + L) tokens of knowledge the step produces (comparable to the
  bare forward); "new tok/s" counts the B x L positions actually computed. ratio = bare time / step time.
* **cache build**: the one-off user-text pass that fills the KV cache (B x T tokens, one pass), raw and coco's.
* **train step** (``--train``): forward + backward into the soft prompt, full pass vs cached suffix
  (the LM is frozen; only the prompt gets gradients) - DESIGN section 7's measurement.
* **generation** (KAR-style knowledge): greedy ``generate`` of N new tokens for B prompts of P tokens
  (prefill included; EOS disabled so every row makes N tokens); tok/s = B x N / time.

On CUDA the models run in bf16 and the achieved FLOP/s is shown as a fraction of the GPU's dense
bf16 peak (H100 / H200 SXM: 989 TFLOP/s; FLOPs counted as 2 x linear-layer parameters per token plus
causal attention). Timings: median of ``--repeats`` after ``--warmup`` runs, CUDA synchronised.

    .venv/bin/python benchmarks/bench_lm_throughput.py                      # CPU, SmolLM2-135M shape
    python benchmarks/bench_lm_throughput.py --device cuda --train          # SmolLM2, Qwen2.5-0.5B/1.5B shapes
    ... --shapes qwen2.5-1.5b --batch 32 --text-len 512 --json out.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

# Published sizes (config.json of each model); the weights are random.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                                   max_position_embeddings=8192, rms_norm_eps=1e-5)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                   intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                                   max_position_embeddings=32768, rms_norm_eps=1e-6)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                   tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6)),
}
# Dense (no sparsity) bf16 peak FLOP/s by device name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
             "L4": 121e12}


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for k, v in PEAK_BF16.items():
        if k in name.upper():
            if k == "H100" and "PCIE" in name.upper():
                return name, 756e12
            return name, v
    return name, None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- models
def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    kind, kw = SHAPES[shape]
    cfg = (LlamaConfig if kind == "llama" else Qwen2Config)(**kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def cache_kwarg(module: torch.nn.Module) -> str:
    """``cache`` (transformers 5.24) or ``past_key_values`` (5.17): read from the forward signature."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def linear_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def attn_flops(cfg: Any, q_len: int, past: int) -> float:
    """FLOPs of QK^T and AV for one sequence over all layers (causal: each query sees the past and its prefix)."""
    d = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    query_key_pairs = q_len * past + q_len * (q_len + 1) / 2
    return cfg.num_hidden_layers * 4.0 * d * query_key_pairs


# ----------------------------------------------------------------------------- the measurements
def bench_shape(shape: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    B, T, L = args.batch, args.text_len, args.prompt_len
    model = build_model(shape, device, dtype)
    dec = decoder_of(model)
    cfg = model.config
    n_lin = linear_params(dec)              # decoder linear layers (no embeddings, no LM head)
    n_head = cfg.vocab_size * cfg.hidden_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, cfg.vocab_size, (B, T), generator=g).to(device)
    prompt = (torch.randn(B, L, cfg.hidden_size, generator=g) * 0.02).to(device, dtype)
    out: dict[str, Any] = {"shape": shape, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                           "batch": B, "text_len": T, "prompt_len": L, "dtype": str(dtype).replace("torch.", "")}
    w, r = args.warmup, args.repeats
    emb = model.get_input_embeddings()

    # bare forward: B x (T + L) tokens, no cache
    full_ids = torch.cat([ids, torch.randint(10, cfg.vocab_size, (B, L), generator=g).to(device)], 1)

    def bare() -> None:
        with torch.inference_mode():
            dec(input_ids=full_ids, use_cache=False)

    t_bare = timeit(bare, device, w, r)
    n_full = B * (T + L)
    out["bare_s"] = t_bare
    out["bare_tok_s"] = n_full / t_bare
    out["bare_flops"] = 2.0 * n_lin * n_full + B * attn_flops(cfg, T + L, 0)

    # raw Hugging Face path: one text pass with use_cache, then the suffix over a fresh cache per step
    kw = cache_kwarg(dec)
    from transformers import DynamicCache

    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    mask_text = torch.ones(B, T, dtype=torch.long, device=device)
    mask_all = torch.ones(B, T + L, dtype=torch.long, device=device)
    pos = torch.arange(T, T + L, device=device).expand(B, L)

    def raw_build() -> None:
        with torch.inference_mode():
            o = dec(input_ids=ids, attention_mask=mask_text, use_cache=True)
        c = getattr(o, "cache", None)
        c = c if c is not None else o.past_key_values
        saved[:] = ([(layer.keys, layer.values) for layer in c.layers] if hasattr(c, "layers")
                    else list(zip(c.key_cache, c.value_cache)))

    def _raw_suffix(p: torch.Tensor) -> torch.Tensor:
        cache = DynamicCache(list(saved))   # a fresh cache object per step; the saved tensors are not appended to
        return dec(inputs_embeds=p, attention_mask=mask_all, position_ids=pos, use_cache=True,
                   **{kw: cache}).last_hidden_state

    def raw_suffix() -> Any:
        with torch.inference_mode():
            return _raw_suffix(prompt)

    def suffix_train() -> None:
        p = prompt.detach().requires_grad_(True)
        _raw_suffix(p).float().sum().backward()

    def full_train() -> None:
        p = prompt.detach().requires_grad_(True)
        x = torch.cat([emb(ids), p], 1)
        dec(inputs_embeds=x, attention_mask=mask_all, use_cache=False).last_hidden_state[:, T:].float().sum().backward()

    t_rb = timeit(raw_build, device, 1, max(1, r // 2))
    raw_build()
    out["raw_cache_kwarg"] = kw
    out["raw_build_s"], out["raw_build_tok_s"] = t_rb, B * T / t_rb
    out["build_flops"] = 2.0 * n_lin * B * T + B * attn_flops(cfg, T, 0)
    t_rs = timeit(raw_suffix, device, w, r)
    out["raw_suffix_s"], out["raw_suffix_eff_tok_s"], out["raw_suffix_ratio"] = t_rs, n_full / t_rs, t_bare / t_rs
    out["suffix_flops"] = 2.0 * n_lin * B * L + B * attn_flops(cfg, L, T)
    train_path = "raw HF"

    # the package's kv-cache path (what CoCo runs): ragged store -> gather -> fresh cache -> suffix pass
    try:
        from cocorec.coco.kvcache import UserTextKVCache
        from cocorec.knowledge.lm import LM, tiny_tokenizer
    except ImportError as e:
        out["extraction_path"] = f"raw HF decoder forward, {kw}=DynamicCache (cocorec.coco.kvcache not importable: {e})"
        print(f"  note: cocorec.coco.kvcache not importable ({e}); coco extraction = the raw HF cached forward")
        t_suf, t_build = t_rs, t_rb
    else:
        lm = LM(model, tiny_tokenizer(), identity=f"random:{shape}")
        # batch_tokens = B x T: the build is one pass over the batch, like the raw build it is compared with
        # (CoCo runs set it with method.kv_batch_tokens; its default 4096 bounds a CPU build's memory)
        kvc = UserTextKVCache(lm, ids.cpu().tolist(), dtype=dtype, keep_hidden=True, batch_tokens=B * T,
                              storage="device" if device.type == "cuda" else "memory")
        users = list(range(B))

        def build() -> None:
            kvc.invalidate()
            kvc.ensure(users)

        def suffix() -> Any:
            with torch.inference_mode():
                return kvc.suffix_hidden(users, prompt)

        def suffix_train() -> None:  # noqa: F811 - the package path replaces the raw one
            p = prompt.detach().requires_grad_(True)
            h, _, _ = kvc.suffix_hidden(users, p)
            h.float().sum().backward()

        def full_train() -> None:  # noqa: F811
            p = prompt.detach().requires_grad_(True)
            h, _, _ = kvc.full_hidden(users, p)
            h.float().sum().backward()

        out["extraction_path"] = ("cocorec.coco.kvcache.UserTextKVCache.suffix_hidden "
                                  "(gather + DynamicCache + suffix pass)")
        train_path = "cocorec UserTextKVCache"
        t_build = timeit(build, device, 1, max(1, r // 2))
        build()
        t_suf = timeit(suffix, device, w, r)
    out["cache_build_s"], out["cache_build_tok_s"] = t_build, B * T / t_build
    out["suffix_s"] = t_suf
    out["suffix_eff_tok_s"] = n_full / t_suf
    out["suffix_new_tok_s"] = B * L / t_suf
    out["suffix_ratio"] = t_bare / t_suf
    if args.train:
        t_ft = timeit(full_train, device, w, r)
        t_st = timeit(suffix_train, device, w, r)
        out.update(train_path=train_path, train_full_s=t_ft, train_suffix_s=t_st, train_ratio=t_ft / t_st)

    # generation (KAR-style): B prompts of P tokens, exactly N new tokens each
    P, N = args.gen_prompt_len, args.gen_new_tokens
    gids = torch.randint(10, cfg.vocab_size, (args.gen_batch, P), generator=g).to(device)
    gmask = torch.ones_like(gids)

    def gen() -> None:
        with torch.inference_mode():
            o = model.generate(input_ids=gids, attention_mask=gmask, max_new_tokens=N, min_new_tokens=N,
                               do_sample=False, pad_token_id=0, eos_token_id=None)
        assert o.shape[1] == P + N, o.shape

    t_gen = timeit(gen, device, 1, max(1, r // 2))
    out["gen_s"] = t_gen
    out["gen_batch"], out["gen_prompt_len"], out["gen_new_tokens"] = args.gen_batch, P, N
    out["gen_tok_s"] = args.gen_batch * N / t_gen
    out["gen_flops"] = (2.0 * n_lin * args.gen_batch * (P + N) + 2.0 * n_head * args.gen_batch * (N + 1)
                        + args.gen_batch * (attn_flops(cfg, P, 0)
                                            + sum(attn_flops(cfg, 1, P + i) for i in range(N))))
    model = dec = None   # frees the weights before the next shape (the closures above read these names)
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return out


def report(res: dict[str, Any], peak: float | None) -> None:
    def mfu(flops_key: str, t_key: str) -> str:
        if peak is None:
            return ""
        achieved = res[flops_key] / res[t_key]
        return f"  {achieved / 1e12:6.1f} TFLOP/s = {100 * achieved / peak:5.1f}% of peak"

    B, T, L = res["batch"], res["text_len"], res["prompt_len"]
    print(f"\n{res['shape']} ({res['params_M']}M params, {res['dtype']}), batch {B}, text {T} + prompt {L} tokens")
    print(f"  extraction path: {res['extraction_path']}")
    print(f"  bare forward     {res['bare_s'] * 1e3:9.1f} ms  {res['bare_tok_s']:>11,.0f} tok/s (B x (T+L), no cache)"
          + mfu("bare_flops", "bare_s"))
    print(f"  raw cache build  {res['raw_build_s'] * 1e3:9.1f} ms  {res['raw_build_tok_s']:>11,.0f} tok/s "
          f"(B x T text pass, use_cache)" + mfu("build_flops", "raw_build_s"))
    print(f"  raw suffix step  {res['raw_suffix_s'] * 1e3:9.1f} ms  {res['raw_suffix_eff_tok_s']:>11,.0f} eff tok/s; "
          f"ratio vs bare forward {res['raw_suffix_ratio']:.1f}x (HF forward, {res['raw_cache_kwarg']}=DynamicCache "
          f"of saved KV)" + mfu("suffix_flops", "raw_suffix_s"))
    print(f"  coco cache build {res['cache_build_s'] * 1e3:9.1f} ms  {res['cache_build_tok_s']:>11,.0f} tok/s "
          f"(B x T, once per user while LoRA is frozen)" + mfu("build_flops", "cache_build_s"))
    print(f"  coco extraction  {res['suffix_s'] * 1e3:9.1f} ms  {res['suffix_eff_tok_s']:>11,.0f} eff tok/s, "
          f"{res['suffix_new_tok_s']:,.0f} new tok/s; ratio vs bare forward {res['suffix_ratio']:.1f}x"
          + mfu("suffix_flops", "suffix_s"))
    if "train_full_s" in res:
        print(f"  train step (fwd+bwd into the prompt, {res['train_path']}): full {res['train_full_s'] * 1e3:.1f} ms "
              f"vs cached suffix "
              f"{res['train_suffix_s'] * 1e3:.1f} ms ({res['train_ratio']:.1f}x)")
    print(f"  generation       {res['gen_s'] * 1e3:9.1f} ms  {res['gen_tok_s']:>11,.0f} new tok/s "
          f"(batch {res['gen_batch']}, prompt {res['gen_prompt_len']}, {res['gen_new_tokens']} new, prefill included)"
          + mfu("gen_flops", "gen_s"))
    if "peak_mem_gb" in res:
        print(f"  peak GPU memory {res['peak_mem_gb']:.1f} GB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--shapes", nargs="*", default=None,
                    help=f"of {', '.join(SHAPES)} (default: smollm2-135m on CPU, all three on CUDA)")
    ap.add_argument("--batch", type=int, default=None, help="users per step (default 4 on CPU, 32 on CUDA)")
    ap.add_argument("--text-len", type=int, default=None, help="user-text tokens (default 128 on CPU, 512 on CUDA)")
    ap.add_argument("--prompt-len", type=int, default=8, help="soft-prompt tokens (default 8)")
    ap.add_argument("--gen-batch", type=int, default=None, help="generation batch (default 4 on CPU, 32 on CUDA)")
    ap.add_argument("--gen-prompt-len", type=int, default=None, help="generation prompt tokens (64 CPU / 256 CUDA)")
    ap.add_argument("--gen-new-tokens", type=int, default=None, help="generated tokens (16 CPU / 128 CUDA)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--train", action="store_true", help="also time a train step (fwd+bwd) full vs cached suffix")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = dict(batch=(32, 4), text_len=(512, 128), gen_batch=(32, 4), gen_prompt_len=(256, 64),
                    gen_new_tokens=(128, 16), warmup=(3, 1), repeats=(10, 3))
    for k, (g_val, c_val) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, g_val if gpu else c_val)
    shapes = args.shapes or (list(SHAPES) if gpu else ["smollm2-135m"])
    for s in shapes:
        if s not in SHAPES:
            print(f"error: unknown shape {s!r} (one of {', '.join(SHAPES)})", file=sys.stderr)
            return 2
    dtype = torch.bfloat16 if gpu else torch.float32
    name, peak = peak_flops(device)
    import transformers

    print(f"device {name}; torch {torch.__version__}, transformers {transformers.__version__}"
          + (f", {torch.get_num_threads()} CPU threads" if not gpu else "")
          + (f"; dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else "")
          + f"; random weights, {str(dtype).replace('torch.', '')}; "
          f"median of {args.repeats} after {args.warmup} warm-up")
    results = []
    failed = 0
    for s in shapes:
        t0 = time.perf_counter()
        try:
            res = bench_shape(s, args, device, dtype)
        except Exception as e:  # one shape failing (e.g. out of memory) still reports the others
            failed += 1
            import traceback

            print(f"\n{s}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            traceback.print_exc(limit=4)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        res["bench_seconds"] = round(time.perf_counter() - t0, 1)
        res["device"] = name
        res["peak_flops"] = peak
        report(res, peak)
        results.append(res)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                           "results": results}, f, indent=2)
    if args.json:
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
