"""KAR knowledge generation on Ray Data (``--engine ray``) vs one process: equal texts and throughput.

The same N real KAR prompts (the first ``--users`` user prompts and ``--items`` item prompts of the
dataset), the same LM, batches and settings, generated twice in one run, each into a fresh temporary
cache (the user's ``~/.cache/cocorec/knowledge`` is never touched; the converted LM is reused):

* **one process**: :class:`cocorec.knowledge.kar.KnowledgeStore` with ``--local-threads`` torch threads
  (the LM loaded before the clock starts);
* **Ray**: :class:`cocorec.knowledge.ray_engine.RayKnowledgeStore`, a local Ray with ``--actors`` actors of
  ``--threads-per-actor`` threads, user and item prompts in one job. Its wall time includes Ray's
  scheduling and each actor's start and LM load; the start-up before the first batch is printed apart.

Prints whether every text is identical, and texts/s both ways.

    .venv/bin/python benchmarks/bench_ray_knowledge.py                       # 64 + 64 ml-100k prompts, SmolLM2 fp32
    .venv/bin/python benchmarks/bench_ray_knowledge.py --users 16 --items 16 --max-new-tokens 16   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--lm", default="smollm2")
    ap.add_argument("--dtype", default="float32", help="LM dtype (the KAR default float32)")
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="user prompts per batch (both ways)")
    ap.add_argument("--item-batch-size", type=int, default=16, help="item prompts per batch (both ways)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--threads-per-actor", type=int, default=1)
    ap.add_argument("--local-threads", type=int, default=2)
    ap.add_argument("--ray-first", action="store_true", help="run Ray before the single process")
    ap.add_argument("--also-one-thread", action="store_true",
                    help="also time one process with 1 thread (on a loaded box 2 OpenMP threads can stall)")
    args = ap.parse_args()

    import torch

    from cocorec.data import prepare
    from cocorec.knowledge import kar
    from cocorec.knowledge.kar import KnowledgeStore
    from cocorec.knowledge.ray_engine import RayKnowledgeStore

    data = prepare(args.dataset, data_dir=args.data_dir)
    users = list(range(min(args.users, data.n_users)))
    items = list(range(1, min(args.items, data.spec.n_items - 1) + 1))
    system = kar.system_message(data)
    prompts = {"user": [kar.user_prompt(data, u) for u in users], "item": [kar.item_prompt(data, i) for i in items]}
    n = sum(len(set(p)) for p in prompts.values())
    settings = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    item_batch_size=args.item_batch_size, lm_dtype=args.dtype, lm_device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-knowledge-"))
    print(json.dumps({"machine": f"{os.cpu_count()} CPUs, {_cpu_model()}", "torch": torch.__version__,
                      "load_avg_before": [round(x, 2) for x in os.getloadavg()],
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dataset": data.name,
                      "users": len(users), "items": len(items), "distinct_prompts": n, **settings,
                      "actors": args.actors, "threads_per_actor": args.threads_per_actor,
                      "local_threads": args.local_threads}), flush=True)
    out: dict[str, dict] = {}

    def local(threads: int | None = None, name: str = "local") -> None:
        threads = threads or args.local_threads
        torch.set_num_threads(threads)
        store = KnowledgeStore(args.lm, "minilm", root=tmp / name, **settings)
        t0 = time.perf_counter()
        _ = store.lm
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = {k: store.generate(k, p, system=system) for k, p in prompts.items()}
        dt = time.perf_counter() - t0
        out[name] = {"texts": texts, "gen_s": dt, "load_s": load, "identity": store.lm.identity}
        print(json.dumps({"engine": "one process", "threads": threads, "lm_load_s": round(load, 1),
                          "generate_s": round(dt, 1), "texts_per_s": round(n / dt, 2),
                          "load_avg": [round(x, 2) for x in os.getloadavg()]}), flush=True)

    def ray() -> None:
        t0 = time.perf_counter()
        store = RayKnowledgeStore(args.lm, "minilm", root=tmp / "ray", actors=args.actors,
                                  threads=args.threads_per_actor, **settings)
        ident = store.lm.identity   # starts the local Ray and plans the LM identity
        init = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = store.generate_many([(k, p, system) for k, p in prompts.items()])
        dt = time.perf_counter() - t0
        job = store.last_job
        store.close()
        out["ray"] = {"texts": dict(zip(prompts, res)), "gen_s": dt, "identity": ident}
        steady = dt - job["startup_s"]
        print(json.dumps({"engine": "ray", "actors": args.actors, "threads_per_actor": args.threads_per_actor,
                          "ray_init_s": round(init, 1), "job_s": round(dt, 1),
                          "startup_s": round(job["startup_s"], 1), "texts_per_s": round(n / dt, 2),
                          "texts_per_s_after_startup": round(n / steady, 2),
                          "actor_busy_s": round(sum(job["batch_seconds"]), 1), "batches": job["batches"],
                          "load_avg": [round(x, 2) for x in os.getloadavg()]}), flush=True)

    try:
        for step in ((ray, local) if args.ray_first else (local, ray)):
            step()
        if args.also_one_thread:
            local(1, "local1")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = out["local"], out["ray"]
    same = {k: sum(x == y for x, y in zip(a["texts"][k], b["texts"][k])) for k in prompts}
    diff = [(k, j) for k in prompts for j, (x, y) in enumerate(zip(a["texts"][k], b["texts"][k])) if x != y]
    print(json.dumps({"identity_equal": a["identity"] == b["identity"], "identical_texts": same,
                      "of": {k: len(p) for k, p in prompts.items()}, "first_differences": diff[:5]}))
    print(f"\ntexts identical: {sum(same.values())} of {sum(len(p) for p in prompts.values())}"
          f"\none process ({args.local_threads} threads): {n / a['gen_s']:.2f} texts/s ({a['gen_s']:.1f} s, "
          f"LM loaded before)"
          f"\nRay ({args.actors} actors x {args.threads_per_actor} thread): {n / b['gen_s']:.2f} texts/s "
          f"({b['gen_s']:.1f} s with actor start-up and LM loading) = {a['gen_s'] / b['gen_s']:.2f}x one process")
    if "local1" in out:
        c = out["local1"]
        same1 = sum(x == y for k in prompts for x, y in zip(a["texts"][k], c["texts"][k]))
        print(f"one process (1 thread): {n / c['gen_s']:.2f} texts/s ({c['gen_s']:.1f} s); texts identical to the "
              f"{args.local_threads}-thread ones: {same1} of {sum(len(p) for p in prompts.values())}")


if __name__ == "__main__":
    main()
