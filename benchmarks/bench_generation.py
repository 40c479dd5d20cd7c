"""Batched vs one-at-a-time greedy generation with the real SmolLM2 (KAR-like prompts).

Same prompts, same settings, same LM; prints generated tokens/s for each mode and the ratio.
Outputs should be identical (greedy, left padding), which the script checks.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_generation.py                # defaults below
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_generation.py --n 16 --threads 2
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    main()
