"""Which knowledge field moves the test metrics: trained kar/r4ec runs scored with a field zeroed.

    .venv/bin/python docs/results/field_ablation.py runs/bench/full/ml-100k > docs/results/field-ablation.md
    .venv/bin/python docs/results/field_ablation.py runs/bench/full/ml-1m-3k > docs/results/field-ablation-ml-1m-3k.md

Loads every ``*-kar-s*`` / ``*-r4ec-s*`` run under the given directory from its checkpoint alone
(:func:`cocorec.serve.scorer.load_scorer`) and scores the test split four ways: both fields, the user
field zeroed, the item field zeroed, both zeroed (zero is what the backbone sees for "no knowledge").
Nothing is retrained: this says what the trained model takes from each field, not what a model
trained without it would do (``kar-item`` trains one).
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from cocorec.eval.metrics import evaluate_predictions
from cocorec.serve.scorer import load_scorer

MASKS = {"both": {"user": 1, "item": 1}, "user zeroed": {"user": 0, "item": 1},
         "item zeroed": {"user": 1, "item": 0}, "none": {"user": 0, "item": 0}}


def ablate(run_dir: Path) -> dict[str, dict[str, float]]:
    scorer = load_scorer(run_dir)
    data, fields = scorer.data, scorer.method.fields
    test = data.split("test")
    out = {}
    for name, mask in MASKS.items():
        probs = []
        with torch.no_grad():
            for batch in data.batches("test", 8192):
                k = [f * mask[n] for f, n in zip(scorer.method(batch), fields)]
                probs.append(torch.sigmoid(scorer.model(batch, k).float()).numpy())
        out[name] = evaluate_predictions(test.label, np.concatenate(probs), test.user)
    return out


def main(root: str) -> None:
    torch.set_num_threads(2)
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for d in sorted(Path(root).iterdir()):
        backbone, _, rest = d.name.partition("-")
        method = rest.split("-s")[0]
        if method in ("kar", "r4ec") and (d / "checkpoint" / "config.json").is_file():
            cells[(backbone, method)].append(ablate(d))
            print(f"scored {d}", file=sys.stderr, flush=True)
    print(f"Test metrics of the trained kar/r4ec runs under `{root}` ({Path(root).name}), scored with knowledge fields "
          f"zeroed after training; mean over the seeds counted in each row. Made by "
          f"`docs/results/field_ablation.py`.\n")
    for metric in ("auc", "gauc"):
        print(f"| backbone | method | seeds | {metric.upper()} both | user zeroed | item zeroed | none |")
        print("|---|---|---|---:|---:|---:|---:|")
        for (b, m), runs in cells.items():
            vals = [f"{np.mean([r[k][metric] for r in runs]):.4f}" for k in MASKS]
            print(f"| {b} | {m} | {len(runs)} | " + " | ".join(vals) + " |")
        print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench/full/ml-100k")
