"""One model pass of the service, in process: the trained backbone vs its inference form, eager and traced.

For a bundle, builds requests of 100 random candidates for random known users (as ``bench_serve.py``
sends them), batches ``k`` of them into one pass (the service batches concurrent requests), and times
per request (median of ``--reps`` rounds of 30 passes, the engines interleaved in each round):

* ``eager``: the trained model as loaded (``BundleScorer(jit=False)``);
* ``jit``: its frozen TorchScript trace (the service's engine before ``for_inference``; the baseline);
* ``eager-inference`` / ``jit-inference``: :meth:`~cocorec.models.base.BaseModel.for_inference` with the
  bundle's item tables, eager and traced (the service's engine now).

Also prints the largest logit difference of each engine to ``eager`` on the timed batches.

    python benchmarks/bench_serve_pass.py --bundle bundles/din-base --threads 1
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from cocorec.serve.bundle import BundleScorer, _Traced


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--per-pass", default="1,2,4", help="requests batched into one pass")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b = BundleScorer(args.bundle, jit=False)
    rng = np.random.default_rng(args.seed)
    n_c = min(args.candidates, len(b.item_ids))
    pool = [b.request(b.user_ids[rng.integers(len(b.user_ids))],
                      [b.item_ids[i] for i in rng.choice(len(b.item_ids), n_c, replace=False)]) for _ in range(64)]
    first = b.user_batch(pool[0].row, pool[0].items)
    k_first = tuple(b.lookup(first) or ())

    def traced(model: torch.nn.Module) -> torch.jit.ScriptModule:
        with torch.no_grad():
            t = torch.jit.trace(_Traced(model, len(k_first)).eval(), (dict(first), k_first), strict=False,
                                check_trace=False)
            return torch.jit.optimize_for_inference(torch.jit.freeze(t))

    fast = b.model.for_inference(b.item_feats, b.item_tags)
    engines = {"eager": lambda x, k: b.model(x, list(k) or None),
               "jit": traced(b.model),
               "eager-inference": lambda x, k: fast(x, list(k) or None),
               "jit-inference": traced(fast)}
    print(f"{platform.node()} ({platform.machine()}), torch {torch.__version__}, {args.threads} thread(s), "
          f"{b.config['backbone']} + {b.method}, {n_c} candidates a request; per request, median of {args.reps}")
    print("| requests / pass | " + " | ".join(f"{n} ms" for n in engines) + " | jit-inference / jit | "
          "max logit diff to eager |")
    print("|---:|" + "---:|" * (len(engines) + 2))
    for k in (int(v) for v in args.per_pass.split(",")):
        batches = []
        for j in range(30):
            parts = [b.user_batch(r.row, r.items) for r in (pool[(j * k + i) % len(pool)] for i in range(k))]
            x = parts[0] if k == 1 else {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
            batches.append((x, tuple(b.lookup(x) or ())))
        times: dict[str, list[float]] = {n: [] for n in engines}
        with torch.inference_mode():
            ref = [engines["eager"](x, kn) for x, kn in batches]
            diff = max(float((engines["jit-inference"](dict(x), kn) - r).abs().max())
                       for (x, kn), r in zip(batches, ref))
            for _ in range(args.reps):
                for n, f in engines.items():
                    t0 = time.perf_counter()
                    for x, kn in batches:
                        f(dict(x), kn)
                    times[n].append((time.perf_counter() - t0) / len(batches) / k * 1e3)
        med = {n: float(np.median(v)) for n, v in times.items()}
        print(f"| {k} | " + " | ".join(f"{med[n]:.3f}" for n in engines)
              + f" | {med['jit-inference'] / med['jit']:.2f} | {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
