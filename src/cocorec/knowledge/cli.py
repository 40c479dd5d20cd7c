"""``cocorec knowledge``: generate and inspect the text knowledge of kar / r4ec.

    cocorec knowledge generate --dataset ml-100k --method kar [--lm smollm2] [--max-new-tokens 64]
    cocorec knowledge generate --dataset ml-100k --method r4ec --rounds 1 --limit-users 50 --limit-items 0
    cocorec knowledge show --dataset ml-100k --user 196 --method r4ec

``generate`` prints what it will generate and how much is cached, times the first batch for an
estimate, then shows a progress bar; a killed run resumes where it stopped (every batch is flushed).
Its defaults are the kar/r4ec method defaults, so ``cocorec train --method kar`` afterwards finds
everything in the cache. ``show`` never generates: it prints the prompts and what the cache holds.
"""

from __future__ import annotations

import argparse
import inspect
import time
from typing import Any

_DEFAULTS = {"lm": "smollm2", "encoder": "minilm", "max_new_tokens": 64, "batch_size": 32, "item_batch_size": 64,
             "lm_device": "auto", "lm_dtype": "float32", "rounds": 1}


def _method_defaults() -> dict[str, Any]:
    """The generation defaults of the r4ec method (a superset of kar's), so CLI and training agree."""
    try:
        from cocorec.knowledge.kar import R4ecMethod

        sig = inspect.signature(R4ecMethod.__init__)
        return {k: sig.parameters[k].default for k in _DEFAULTS}
    except Exception:  # pragma: no cover - keeps --help working if the LM stack cannot import
        return dict(_DEFAULTS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = _method_defaults()
    sub = p.add_subparsers(dest="knowledge_action", required=True)
    for name, help_ in (("generate", "generate (or resume) and encode the knowledge of a dataset"),
                        ("show", "print a user's prompt and generated text (cache only; never generates)")):
        q = sub.add_parser(name, help=help_)
        q.add_argument("--dataset", default="ml-100k", help="ml-100k, ml-1m-3k, or a generic-format directory")
        q.add_argument("--data-dir", default=None, help="directory holding the dataset")
        q.add_argument("--method", default="kar", choices=["kar", "r4ec"])
        q.add_argument("--lm", default=d["lm"], help="smollm2 (default), a .gguf file, a model directory or hub id")
        q.add_argument("--lm-device", default=d["lm_device"], help="auto | cpu | cuda")
        q.add_argument("--lm-dtype", default=d["lm_dtype"], help="auto | float32 | bf16 (part of the cache key)")
        q.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"],
                       help="tokens per generated text (part of the cache key; default %(default)s)")
        q.add_argument("--rounds", type=int, default=d["rounds"], help="r4ec reflect-and-refine rounds")
        q.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        if name == "generate":
            q.add_argument("--encoder", default=d["encoder"], help="minilm (default) or an encoder directory")
            q.add_argument("--batch-size", type=int, default=d["batch_size"], help="user prompts per batch")
            q.add_argument("--item-batch-size", type=int, default=d["item_batch_size"], help="item prompts per batch")
            q.add_argument("--limit-users", type=int, default=None, help="only the first N users")
            q.add_argument("--limit-items", type=int, default=None, help="only the first N items")
            q.add_argument("--no-encode", action="store_true", help="generate text only (no vectors)")
            q.add_argument("--quiet", action="store_true", help="no progress bar")
            q.add_argument("--engine", default="local", choices=["local", "ray"],
                           help="local: this process; ray: a Ray Data actor pool, one LM per actor (cocorec[scale])")
            q.add_argument("--address", default=None, help="--engine ray: a Ray cluster address (default: a local Ray)")
            q.add_argument("--actors", type=int, default=None,
                           help="--engine ray: LM actors (default: one per GPU, else one per --threads CPUs)")
        else:
            q.add_argument("--user", required=True, help="the dataset's own user id (e.g. 196)")
            q.add_argument("--item", default=None, help="also show an item's prompt and facts (dataset item id)")
    from cocorec.serve.refresh import add_refresh_args

    add_refresh_args(sub.add_parser("refresh", help="compute the knowledge of the users a serving bundle queued "
                                    "and swap it into the bundle (and the running service)"))


def _store(args: argparse.Namespace, progress: bool = False) -> Any:
    from cocorec.knowledge.kar import KnowledgeStore

    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=getattr(args, "batch_size", 32),
              item_batch_size=getattr(args, "item_batch_size", 64), lm_device=args.lm_device,
              lm_dtype=args.lm_dtype, progress=progress, log=lambda m: print(m, flush=True))
    if getattr(args, "engine", "local") == "ray":   # the same cache; the actors generate (--threads each)
        from cocorec.knowledge.ray_engine import RayKnowledgeStore, require_ray

        require_ray()
        return RayKnowledgeStore(args.lm, args.encoder, address=args.address, actors=args.actors,
                                 threads=args.threads, **kw)
    return KnowledgeStore(args.lm, getattr(args, "encoder", "minilm"), **kw)


def _load(args: argparse.Namespace) -> Any:
    import torch

    from cocorec.data import prepare

    if args.threads and getattr(args, "engine", "local") == "local":   # ray: the threads of each actor
        torch.set_num_threads(args.threads)
    return prepare(args.dataset, data_dir=args.data_dir)


def cmd_generate(args: argparse.Namespace) -> int:
    from cocorec.knowledge import kar

    t_start = time.perf_counter()
    data = _load(args)
    n_u = data.n_users if args.limit_users is None else max(0, min(args.limit_users, data.n_users))
    n_i = data.spec.n_items - 1 if args.limit_items is None else max(0, min(args.limit_items, data.spec.n_items - 1))
    users, items = list(range(n_u)), list(range(1, n_i + 1))
    store = _store(args, progress=not args.quiet)
    lm = store.lm
    print(f"dataset {data.name}: {n_u} of {data.n_users} users, {n_i} of {data.spec.n_items - 1} items; "
          f"method {args.method}" + (f" ({args.rounds} round(s))" if args.method == "r4ec" else ""))
    print(f"LM {lm.identity} on {lm.device}; max_new_tokens {args.max_new_tokens}, batch {args.batch_size} users / "
          f"{args.item_batch_size} items; torch threads {__import__('torch').get_num_threads()}")
    system = kar.system_message(data)
    total_u, cached_u = store.count_cached("user", [kar.user_prompt(data, u) for u in users], system)
    total_i, cached_i = store.count_cached("item", [kar.item_prompt(data, i) for i in items], system)
    print(f"to generate: user reasoning {total_u - cached_u} ({cached_u} of {total_u} cached), "
          f"item facts {total_i - cached_i} ({cached_i} of {total_i} cached)"
          + (f", then up to {2 * args.rounds * n_u} reflect/refine texts" if args.method == "r4ec" else ""))
    print(f"text cache: {store.root / 'text'}", flush=True)
    t0 = time.perf_counter()
    if args.engine == "ray":   # user and item texts in one actor-pool job
        store.prefill(data, users, items)
    if args.no_encode:
        store.user_texts(data, users, args.method, args.rounds)
        store.item_facts(data, items)
    else:
        store.user_vectors(data, users, args.method, args.rounds)
        store.item_vectors(data, items)
    dt = time.perf_counter() - t0
    gen = sum(v["generated"] for k, v in store.stats.items() if k != "encode")
    print(f"done in {dt / 60:.1f} min ({time.perf_counter() - t_start:.0f} s with loading): generated {gen} texts; "
          + ", ".join(f"{k} {v['generated']} new / {v['cached']} cached" for k, v in store.stats.items()))
    for k, s in store.seconds.items():
        n = store.stats.get(k, {}).get("generated", 0)
        if n:
            print(f"  {k}: {s:.0f} s, {n / s:.2f} texts/s")
    return 0


def _find(ids: list[str], value: str, what: str) -> int:
    from cocorec.data.errors import DataError

    try:
        return ids.index(str(value))
    except ValueError:
        raise DataError(f"{what} id {value!r} is not in the dataset (e.g. {', '.join(ids[:3])})") from None


def cmd_show(args: argparse.Namespace) -> int:
    from cocorec.knowledge import kar

    data = _load(args)
    u = _find(data.user_ids, args.user, "user")
    store = _store(args)
    print(f"LM {store.lm.identity}; max_new_tokens {args.max_new_tokens}\n")
    missing = "(not generated yet: run `cocorec knowledge generate` with the same settings)"
    prompt, system = kar.user_prompt(data, u), kar.system_message(data)
    print(f"== user {args.user}: prompt ==\n{prompt}\n")
    text = store.cached("user", prompt, system)
    print(f"== user {args.user}: generated reasoning ==\n{text if text is not None else missing}\n")
    if args.method == "r4ec" and text is not None:
        hist = kar.user_history_part(data, u)
        current = text
        for r in range(1, args.rounds + 1):
            critique = store.cached("reflect", kar.reflect_prompt(data, hist, current), system)
            print(f"== round {r}: reflection ==\n{critique if critique is not None else missing}\n")
            if critique is None:
                break
            refined = store.cached("refine", kar.refine_prompt(data, hist, current, critique), system)
            print(f"== round {r}: refinement ==\n{refined if refined is not None else missing}\n")
            if refined is None:
                break
            current = refined
    if args.item is not None:
        i = _find(data.item_ids, args.item, "item") + 1
        ip = kar.item_prompt(data, i)
        facts = store.cached("item", ip, system)
        print(f"== item {args.item}: prompt ==\n{ip}\n\n== item {args.item}: facts ==\n"
              f"{facts if facts is not None else missing}")
    return 0


def handler(args: argparse.Namespace) -> int:
    if args.knowledge_action == "refresh":
        from cocorec.serve.refresh import cmd_refresh

        return cmd_refresh(args)
    return cmd_generate(args) if args.knowledge_action == "generate" else cmd_show(args)

