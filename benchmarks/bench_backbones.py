"""Training throughput of every CTR backbone on ml-100k, on CPU.

One step = forward + BCE loss + backward + AdamW step on a batch of 1024 training samples
(batches gathered beforehand, so only the model is timed). After 3 warm-up steps, the median
over 20 timed steps gives samples/s.

    .venv/bin/python benchmarks/bench_backbones.py [--threads 2] [--batch-size 1024] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from cocorec.data import prepare
from cocorec.models import build_model

NAMES = ["deepfm", "din", "dien", "dcnv2", "autoint", "xdeepfm"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--knowledge-dims", type=int, nargs="*", default=[],
                    help="dense knowledge fields fed to every model (random values), e.g. 64 64")
    ap.add_argument("--models", nargs="*", default=NAMES)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    data = prepare(args.dataset)
    n_train = data.split("train").n
    rng = np.random.default_rng(0)
    n_batches = args.warmup + args.steps
    batches = [data.batch("train", rng.choice(n_train, args.batch_size, replace=False)) for _ in range(n_batches)]
    g = torch.Generator().manual_seed(0)
    know = [[torch.randn(args.batch_size, k, generator=g) for k in args.knowledge_dims] for _ in range(n_batches)]

    print(f"{args.dataset}: {n_train} training samples; CPU, torch {torch.__version__}, {args.threads} threads, "
          f"batch {args.batch_size}, median of {args.steps} steps after {args.warmup} warm-up; "
          f"knowledge dims {args.knowledge_dims or 'none'}")
    header = f"{'model':<9} {'params':>9} {'ms/step':>9} {'samples/s':>10} {'epoch (s)':>10}"
    print(header)
    print("-" * len(header))
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name, data.spec, knowledge_dims=args.knowledge_dims)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times = []
        for i, (b, k) in enumerate(zip(batches, know)):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(model(b, k or None), b["label"])
            loss = loss + getattr(model, "aux_loss", 0.0)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(dt)
        med = statistics.median(times)
        n_params = sum(p.numel() for p in model.parameters())
        sps = args.batch_size / med
        print(f"{name:<9} {n_params:>9,} {med * 1e3:>9.1f} {sps:>10,.0f} {n_train / sps:>10.1f}")


if __name__ == "__main__":
    main()
