"""Wall time of KAR knowledge generation (user reasoning + item facts + encoding) with the real SmolLM2.

Cold: an empty cache directory (a temporary one unless ``--cache-dir``): every text is generated and
encoded. Warm: the same call again on the filled cache (LM and encoder loaded, nothing generated).
The GGUF -> safetensors conversion is reused from the user cache when it exists (it is not part of
knowledge generation), so "cold" means cold knowledge, not a cold model conversion.

    .venv/bin/python benchmarks/bench_kar_generation.py                      # all of ml-100k (long on CPU)
    .venv/bin/python benchmarks/bench_kar_generation.py --limit-users 32 --limit-items 64 --threads 2
    .venv/bin/python benchmarks/bench_kar_generation.py --device cuda --dtype float32 \
        --batch-size 128 --item-batch-size 256

Prints one JSON line per phase and a summary with texts/s and the projection to all users and items,
then where generation's work goes for these prompts: the prefill tokens of the batches as bucketed now
(by token count) beside the previous order (by characters), and how many texts stopped at EOS before
``max_new_tokens`` (the decode steps a decoder dropping finished rows would save).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def waste(data, users: list[int], items: list[int], args: argparse.Namespace) -> None:
    """Padding of the prefill (bucketed by tokens vs by characters) and early stops, from token counts alone."""
    from cocorec.knowledge.kar import KnowledgeStore, item_prompt, system_message, user_prompt

    store = KnowledgeStore(args.lm, args.encoder, max_new_tokens=args.max_new_tokens, root=args.root,
                           lm_device=args.device, lm_dtype=args.dtype)
    lm, system = store.lm, system_message(data)
    for kind, prompts, bs in (("user", [user_prompt(data, u) for u in users], args.batch_size),
                              ("item", sorted({item_prompt(data, i) for i in items}), args.item_batch_size)):
        if not prompts:
            continue
        ids, _ = lm.prompt_ids(prompts, system, args.max_new_tokens)

        def padded(order: list[int], ids=ids, bs=bs) -> int:
            return sum(max(len(ids[i]) for i in order[s:s + bs]) * len(order[s:s + bs])
                       for s in range(0, len(order), bs))

        real = sum(map(len, ids))
        by_tok = padded(sorted(range(len(ids)), key=lambda i: -len(ids[i])))
        by_chr = padded(sorted(range(len(ids)), key=lambda i: -len(prompts[i])))
        texts = [store.cached(kind, p, system) for p in prompts]
        n_new = [len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts if t is not None]
        early = [n for n in n_new if n < args.max_new_tokens - 1]  # re-tokenized text: +-1 token
        saved = sum(args.max_new_tokens - n for n in early) / max(1, len(n_new) * args.max_new_tokens)
        print(json.dumps({"kind": kind, "prompts": len(ids), "prompt_tokens": real,
                          "prefill_tokens_by_token_length": by_tok, "prefill_tokens_by_characters": by_chr,
                          "padding_share": [round(1 - real / by_tok, 4), round(1 - real / by_chr, 4)],
                          "texts_stopped_early": len(early), "texts": len(n_new),
                          "row_decode_steps_saved_if_finished_rows_dropped": round(saved, 4)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--lm", default="smollm2")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--device", default="auto", help="LM device: auto | cpu | cuda")
    ap.add_argument("--dtype", default="auto", help="LM dtype: auto | float32 | bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--item-batch-size", type=int, default=64)
    ap.add_argument("--limit-users", type=int, default=None)
    ap.add_argument("--limit-items", type=int, default=None)
    ap.add_argument("--cache-dir", default=None, help="knowledge cache root (default: a fresh temporary directory)")
    args = ap.parse_args()

    import torch

    from cocorec.data import prepare
    from cocorec.knowledge.kar import KnowledgeStore

    torch.set_num_threads(args.threads)
    data = prepare(args.dataset, data_dir=args.data_dir)
    n_u = data.n_users if args.limit_users is None else min(args.limit_users, data.n_users)
    n_i = data.spec.n_items - 1 if args.limit_items is None else min(args.limit_items, data.spec.n_items - 1)
    users, items = list(range(n_u)), list(range(1, n_i + 1))
    root = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="bench-kar-"))
    args.root = root

    def once(phase: str) -> dict:
        t0 = time.perf_counter()
        store = KnowledgeStore(args.lm, args.encoder, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                               item_batch_size=args.item_batch_size, root=root, lm_device=args.device,
                               lm_dtype=args.dtype)
        _ = store.lm, store.encoder
        t_load = time.perf_counter() - t0
        store.user_vectors(data, users)
        store.item_vectors(data, items)
        rec = {"phase": phase, "wall_s": round(time.perf_counter() - t0, 1), "load_s": round(t_load, 1),
               "seconds": {k: round(v, 1) for k, v in store.seconds.items()}, "texts": store.stats,
               "lm": store.lm.identity, "device": str(store.lm.device)}
        print(json.dumps(rec), flush=True)
        return rec

    print(json.dumps({"dataset": data.name, "users": n_u, "items": n_i, "threads": args.threads,
                      "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                      "item_batch_size": args.item_batch_size, "cache": str(root)}), flush=True)
    try:
        cold = once("cold")
        warm = once("warm")
        waste(data, users, items, args)
    finally:
        if not args.cache_dir:
            shutil.rmtree(root, ignore_errors=True)
    s = cold["seconds"]
    gen_u, gen_i = s.get("user", 0.0), s.get("item", 0.0)
    print(f"cold: {cold['wall_s']:.0f} s (users {gen_u:.0f} s, items {gen_i:.0f} s, "
          f"encoding {s.get('encode', 0):.0f} s,"
          f" loading {cold['load_s']:.0f} s); warm: {warm['wall_s']:.0f} s")
    if n_u and n_i and gen_u and gen_i:
        per_u, per_i = gen_u / n_u, gen_i / n_i
        all_u, all_i = data.n_users, data.spec.n_items - 1
        print(f"{n_u / gen_u:.2f} users/s, {n_i / gen_i:.2f} items/s -> all {all_u} users + {all_i} items: "
              f"~{(per_u * all_u + per_i * all_i) / 60:.0f} min of generation (projected from the first users/items)")


if __name__ == "__main__":
    main()
