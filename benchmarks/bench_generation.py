"""Generation throughput: batched vs one-at-a-time (real SmolLM2, CPU), or the shapes table (CUDA).

Default mode, real SmolLM2 with KAR-like prompts: same prompts, same settings, same LM; prints generated
tokens/s for each mode and the ratio. Outputs should be identical (greedy, left padding), which the
script checks.

Shapes mode (``--device cuda``, or ``--smoke`` on a CPU): random weights at the published shapes of
SmolLM2-135M and Qwen2.5-1.5B (``bench_lm_throughput.SHAPES``), bf16, prompts of 256 tokens, 96 new
tokens, every row generating all 96 (no early EOS); texts/s of ``LM.generate_ids`` at batch 16, 256,
256 with a static cache + torch.compile, 1024 and ``auto`` (sized from free GPU memory), each printed
beside plain ``model.generate`` at batch 256 timed in the same run. ``--smoke``: a 2-layer model,
32-token prompts, 8 new tokens, batches 2/8/8/32 (a CPU check that the script runs).

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_generation.py                # defaults below
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_generation.py --n 16 --threads 2
    .venv/bin/python benchmarks/bench_generation.py --device cuda [--json out.json]
    .venv/bin/python benchmarks/bench_generation.py --smoke --threads 2
    .venv/bin/python benchmarks/bench_generation.py --cpu-dtypes --threads 2     # fp32 / bf16 / int8 on this CPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from cocorec.knowledge.lm import LMConfig, load_lm  # noqa: E402

TITLES = [
    "Heat (1995)", "Casino (1995)", "Toy Story (1995)", "Fargo (1996)", "Se7en (1995)", "Braveheart (1995)",
    "The Usual Suspects (1995)", "Twelve Monkeys (1995)", "Babe (1995)", "Apollo 13 (1995)",
    "Pulp Fiction (1994)", "The Shawshank Redemption (1994)", "Forrest Gump (1994)", "Speed (1994)",
    "Jurassic Park (1993)", "Schindler's List (1993)", "The Fugitive (1993)", "Groundhog Day (1993)",
    "Aladdin (1992)", "Unforgiven (1992)", "Reservoir Dogs (1992)", "The Silence of the Lambs (1991)",
    "Terminator 2: Judgment Day (1991)", "Goodfellas (1990)", "Blade Runner (1982)", "Alien (1979)",
    "Star Wars (1977)", "Taxi Driver (1976)", "Chinatown (1974)", "The Godfather (1972)",
    "2001: A Space Odyssey (1968)", "Psycho (1960)", "Vertigo (1958)", "Casablanca (1942)",
    "Citizen Kane (1941)", "The Maltese Falcon (1941)", "Amélie (2001)", "Contact (1997)",
    "Titanic (1997)", "L.A. Confidential (1997)",
]
OCCUPATIONS = ["engineer", "student", "librarian", "writer", "doctor", "programmer", "artist", "lawyer"]


def kar_prompt(rng: random.Random) -> str:
    """A KAR-style user-preference reasoning prompt (profile, rated history, scenario factors)."""
    gender = rng.choice(["female", "male"])
    age = rng.choice([18, 25, 35, 45, 50, 56])
    history = rng.sample(TITLES, rng.randint(4, 10))
    rated = "; ".join(f"{t}, {rng.randint(1, 5)} stars" for t in history)
    return (
        f"Given a {gender} user aged {age} who works as a {rng.choice(OCCUPATIONS)}, and this movie viewing "
        f"history with ratings (1 to 5 stars): {rated}. Analyze the user's preferences on movies, considering "
        "factors such as genre, director/actors, time period/country, character, plot/theme, mood/tone, "
        "critical acclaim/award, production quality, and soundtrack. Provide clear explanations based on "
        "relevant details from the user's movie viewing history and other pertinent factors."
    )


# ------------------------------------------------------------------------------ shapes mode
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shape_lm(shape: str, device: torch.device, smoke: bool) -> Any:
    """An LM of random weights at a published shape (``smoke``: its first 2 layers), bf16."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_lm_throughput import SHAPES  # noqa: E402  (the published configs, one place)
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from cocorec.knowledge.lm import LM, tiny_tokenizer

    kind, kw = SHAPES[shape]
    kw = dict(kw, num_hidden_layers=2) if smoke else dict(kw)
    cfg = (LlamaConfig if kind == "llama" else Qwen2Config)(**kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return LM(model, tiny_tokenizer(), identity=f"random:{shape}{':smoke' if smoke else ''}")


def bench_shapes(args: argparse.Namespace) -> int:
    import transformers

    device = torch.device(args.device)
    smoke = args.smoke
    plen, mnt = (32, 8) if smoke else (args.prompt_tokens, args.new_tokens)
    base_bs = 8 if smoke else 256
    runs: list[tuple[str, int | str, bool]] = (
        [("batch 2", 2, False), ("batch 8", 8, False), ("batch 8 static+compile", 8, True), ("batch 32", 32, False),
         ("auto", "auto", False)] if smoke else
        [("batch 16", 16, False), ("batch 256", 256, False), ("batch 256 static+compile", 256, True),
         ("batch 1024", 1024, False), ("auto", "auto", False)])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} CPUs)"
    print(f"device {name}; torch {torch.__version__}, transformers {transformers.__version__}; random weights, "
          f"bf16; prompts {plen} tokens, {mnt} new tokens each (no early stop); "
          f"{'SMOKE: 2 layers; ' if smoke else ''}load average {os.getloadavg()[0]:.1f}", flush=True)
    out: list[dict[str, Any]] = []
    for shape in args.shape_names:
        lm = shape_lm(shape, device, smoke)
        vocab = lm.model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        n_max = max(max(b for _, b, _ in runs if isinstance(b, int)), base_bs)
        rows = torch.randint(100, vocab - 100, (n_max, plen), generator=g).tolist()
        x = torch.tensor(rows[:base_bs], device=device)
        mask = torch.ones_like(x)

        lm.generate_ids(rows[:2], max_new_tokens=2, batch_size=2, stop_at_eos=False)  # warm-up: first allocations
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():  # the baseline: transformers' generate as it comes, no bucketing or sizing
            lm.model.generate(input_ids=x, attention_mask=mask, max_new_tokens=mnt, min_new_tokens=mnt,
                              do_sample=False, pad_token_id=0)
        _sync(device)
        base_s = time.perf_counter() - t0
        base_tps = base_bs / base_s
        print(f"\n{shape}: plain model.generate, batch {base_bs}: {base_tps:,.1f} texts/s "
              f"({base_tps * mnt:,.0f} new tok/s)", flush=True)
        for label, bs, static in runs:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            resolved = lm.resolve_batch_size(bs, plen if not static else -(-plen // 64) * 64, mnt)
            n = min(len(rows), resolved * (1 if resolved >= base_bs else max(1, min(4, base_bs // resolved))))
            rec: dict[str, Any] = {"shape": shape, "mode": label, "batch": resolved, "texts": n}
            try:
                compile_s = None
                if static:  # the first call compiles: timed apart
                    t0 = time.perf_counter()
                    lm.generate_ids(rows[:resolved], max_new_tokens=mnt, batch_size=resolved, stop_at_eos=False,
                                    static_cache=True)
                    _sync(device)
                    compile_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                new = lm.generate_ids(rows[:n], max_new_tokens=mnt, batch_size=resolved, stop_at_eos=False,
                                      static_cache=static)
                _sync(device)
                dt = time.perf_counter() - t0
                assert all(len(r) == mnt for r in new)
                tps = n / dt
                rec.update(texts_per_s=round(tps, 2), new_tok_per_s=round(tps * mnt), seconds=round(dt, 2),
                           vs_plain_256=round(tps / base_tps, 2), plain_256_texts_per_s=round(base_tps, 2))
                if compile_s is not None:
                    rec["first_call_s"] = round(compile_s, 1)
                if device.type == "cuda":
                    rec["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
                static_note = "" if not static or device.type == "cuda" else " (static cache is CUDA-only: off here)"
                print(f"  {label:<26} batch {resolved:>5}: {tps:>9,.1f} texts/s ({tps * mnt:>10,.0f} new tok/s) "
                      f"= {tps / base_tps:5.2f}x plain generate@{base_bs} ({base_tps:,.1f} texts/s, same run)"
                      + (f"; first call {compile_s:.1f} s" if compile_s is not None else "")
                      + (f"; peak {rec['peak_gb']} GB" if "peak_gb" in rec else "") + static_note, flush=True)
            except Exception as e:  # e.g. out of memory at 1024: report, go on
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                print(f"  {label:<26} batch {resolved:>5}: FAILED {rec['error']}", flush=True)
            out.append(rec)
        lm = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__,
                                               "transformers": transformers.__version__, "results": out}, indent=2))
        print(f"\nwrote {args.json}")
    return 1 if any("error" in r for r in out) else 0


# ------------------------------------------------------------------------------ CPU dtypes mode
def bench_cpu_dtypes(args: argparse.Namespace) -> int:
    """fp32 vs bf16 vs dynamic int8 on this CPU, one process, rounds interleaved (a busy box shifts them
    alike): a prefill of 8 x 320 tokens and a generation of 32 x 72 + 9 tokens; then whether each
    dtype gives the one-at-a-time greedy text when batched (8 prompts, 24 new tokens)."""
    import copy
    import warnings

    from cocorec.knowledge.lm import LMConfig, load_lm

    lm = load_lm(LMConfig(name_or_path=args.lm, device="cpu", dtype="float32"))
    models = {"fp32": lm.model, "bf16": copy.deepcopy(lm.model).to(torch.bfloat16)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        models["int8-dynamic"] = torch.ao.quantization.quantize_dynamic(copy.deepcopy(lm.model), {torch.nn.Linear},
                                                                        dtype=torch.qint8)
    g = torch.Generator().manual_seed(args.seed)
    vocab = lm.model.config.vocab_size
    xp = torch.randint(100, vocab - 100, (8, 320), generator=g)
    xg = torch.randint(100, vocab - 100, (32, 72), generator=g)
    best: dict[str, list[float]] = {k: [float("inf"), float("inf")] for k in models}
    print(f"lm {lm.identity}; torch threads {torch.get_num_threads()}; rounds {args.rounds}", flush=True)
    with torch.inference_mode():
        for m in models.values():
            m(input_ids=xp[:, :32], logits_to_keep=1)
        for r in range(args.rounds):
            for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
                m = models[name]
                t0 = time.perf_counter()
                m(input_ids=xp, attention_mask=torch.ones_like(xp), logits_to_keep=1)
                t1 = time.perf_counter()
                m.generate(input_ids=xg, attention_mask=torch.ones_like(xg), max_new_tokens=9, min_new_tokens=9,
                           do_sample=False, pad_token_id=0)
                t2 = time.perf_counter()
                best[name] = [min(best[name][0], t1 - t0), min(best[name][1], t2 - t1)]
            print(f"round {r + 1}: load average {os.getloadavg()[0]:.1f}", flush=True)
    for name, (tp, tg) in best.items():
        print(f"{name:<13} best prefill 8x320 {tp:6.2f} s ({best['fp32'][0] / tp:4.2f}x fp32)   "
              f"generate 32x72+9 {tg:6.2f} s ({best['fp32'][1] / tg:4.2f}x fp32)", flush=True)
    rng = random.Random(args.seed)
    prompts = [kar_prompt(rng)[:200] for _ in range(8)]
    for name, m in models.items():
        lm.model = m
        single = [lm.generate([p], max_new_tokens=24)[0] for p in prompts]
        batched = lm.generate(prompts, max_new_tokens=24, batch_size=8)
        print(f"{name:<13} batched == one at a time: {sum(a == b for a, b in zip(single, batched))}/8", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda: the shapes table (default: the real-SmolLM2 CPU mode)")
    ap.add_argument("--smoke", action="store_true", help="shapes mode at a reduced shape (runs on a CPU)")
    ap.add_argument("--cpu-dtypes", action="store_true", help="fp32 vs bf16 vs int8 speed and batch invariance")
    ap.add_argument("--rounds", type=int, default=4, help="--cpu-dtypes: interleaved rounds")
    ap.add_argument("--shape-names", nargs="*", default=None,
                    help="of bench_lm_throughput.SHAPES (default smollm2-135m, qwen2.5-1.5b; --smoke: smollm2-135m)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--json", default=None, help="shapes mode: write the figures to this JSON file")
    ap.add_argument("--lm", default="smollm2")
    ap.add_argument("--n", type=int, default=32, help="number of prompts")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_dtypes:
        return bench_cpu_dtypes(args)
    if args.device == "cuda" or args.smoke:
        if args.device == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
        args.device = args.device or "cpu"
        args.shape_names = args.shape_names or (["smollm2-135m"] if args.smoke else ["smollm2-135m", "qwen2.5-1.5b"])
        return bench_shapes(args)
    rng = random.Random(args.seed)
    prompts = [kar_prompt(rng) for _ in range(args.n)]

    t0 = time.perf_counter()
    lm = load_lm(LMConfig(name_or_path=args.lm, device="cpu", dtype=args.dtype, max_new_tokens=args.max_new_tokens))
    load_s = time.perf_counter() - t0
    lengths = [len(x) for x in lm.prompt_ids(prompts)[0]]
    print(f"lm: {lm.identity}  load {load_s:.1f} s  torch threads {torch.get_num_threads()}  "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    print(f"{args.n} prompts, {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}, "
          f"chat template included), max_new_tokens {args.max_new_tokens}, greedy", flush=True)

    lm.generate(prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up: first-call allocations

    def count(outs: list[str]) -> int:
        return sum(len(lm.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outs)

    t0 = time.perf_counter()
    batched = lm.generate(prompts, batch_size=args.batch_size)
    t_batched = time.perf_counter() - t0
    n_batched = count(batched)
    print(f"batched (batch {args.batch_size}): {n_batched} new tokens in {t_batched:.1f} s = "
          f"{n_batched / t_batched:.1f} tokens/s", flush=True)

    t0 = time.perf_counter()
    single = [lm.generate([p], batch_size=1)[0] for p in prompts]
    t_single = time.perf_counter() - t0
    n_single = count(single)
    print(f"one at a time:     {n_single} new tokens in {t_single:.1f} s = {n_single / t_single:.1f} tokens/s",
          flush=True)

    same = sum(a == b for a, b in zip(batched, single))
    ratio = (n_batched / t_batched) / (n_single / t_single)
    print(f"ratio batched/one-at-a-time: {ratio:.2f}x   identical outputs: {same}/{args.n}   "
          f"load average now {os.getloadavg()[0]:.1f}")
    print(f"example output: {batched[0][:200]!r}")
    sys.stdout.flush()
    return 0 if same == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
