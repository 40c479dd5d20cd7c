"""The ``cocorec`` command line.

    cocorec data prepare --dataset ml-100k
    cocorec data stats --dataset ml-1m-3k
    cocorec train --dataset ml-100k --backbone din --method base --seed 0 --output runs/din-base-0
    cocorec demo

Bad input (data, config, model paths, an output directory holding another run) ends with one
``error: ...`` line and exit code 2; a file system error (disk full, permissions) with one line and 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cocorec.config import ConfigError, parse_assignments  # noqa: E402
from cocorec.errors import InputError, one_line  # noqa: E402

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="ml-100k", help="ml-100k, ml-1m-3k, or a directory in the generic format")
    p.add_argument("--data-dir", default=None, help="directory holding the dataset (else $COCOREC_DATA, user cache)")
    p.add_argument("--download", action="store_true", help="download the official archive if missing (needs internet)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_data_args(p)
    p.add_argument("--backbone", default="din", help="din | dien | dcnv2 | deepfm | autoint | xdeepfm")
    p.add_argument("--method", default="base", help="base | kar | r4ec | static | coco | coco-novq | coco-nojudge")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="run directory (metrics.json, checkpoint/, last/ for resume)")
    p.add_argument("--results", default="runs/results.jsonl", help="JSONL file that gets one line per run")
    p.add_argument("--epochs", type=int, default=None, help="shorthand for --set train.epochs=N")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (shorthand for train.device)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a setting, e.g. train.lr=0.002 model.embedding_dim=32 method.codebook_size=8")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch logs")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --output (of another configuration, or finished) instead of refusing")


def cmd_data(args: argparse.Namespace) -> int:
    from cocorec.data import prepare

    data = prepare(args.dataset, data_dir=args.data_dir, download=args.download)
    stats = data.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"dataset {stats['dataset']}: {stats['users']} users, {stats['items']} items, "
          f"{stats['llm_history_interactions']} LM-history interactions (never samples)")
    print(f"{'split':<6} {'users':>6} {'samples':>9} {'pos. rate':>9}")
    for s in ("train", "val", "test"):
        st = stats[s]
        print(f"{s:<6} {st['users']:>6} {st['samples']:>9} {st['positive_rate']:>9.4f}")
    for n in stats["notes"]:
        print(f"note: {n}")
    if args.action == "prepare":
        print(f"processed data key: {data.key}")
    return 0


def build_run_config(args: argparse.Namespace) -> Any:
    from cocorec.train.run import RunConfig

    cfg = RunConfig(dataset=args.dataset, backbone=args.backbone.lower(), method=args.method.lower(), seed=args.seed,
                    output=args.output, data_dir=args.data_dir, download=args.download, results=args.results or None,
                    quiet=args.quiet, overwrite=getattr(args, "overwrite", False))
    sections = parse_assignments(args.overrides)
    if args.epochs is not None:
        sections.setdefault("train", {})["epochs"] = str(args.epochs)
    if args.device is not None:
        sections.setdefault("train", {})["device"] = args.device
    return cfg.with_overrides(sections)


def _print_metrics(m: dict[str, Any]) -> None:
    for split in ("val", "test", "test_no_knowledge"):
        if split in m and m[split]:
            v = m[split]
            print(f"{split:<18} AUC {v['auc']:.4f}  LogLoss {v['logloss']:.4f}  GAUC {v['gauc']:.4f}  (n={v['n']})")


def cmd_train(args: argparse.Namespace) -> int:
    from cocorec.train.distributed import is_main
    from cocorec.train.run import execute

    cfg = build_run_config(args)
    res = execute(cfg)
    if not is_main():   # under torchrun rank 0 alone reports (and wrote)
        return 0
    _print_metrics(res.metrics)
    if res.status == "done":
        print(f"already done: {cfg.output} holds this finished run (run key {cfg.key()}); nothing retrained or "
              f"rewritten (--overwrite retrains it)")
        if cfg.results:
            print(f"restored its missing line in {cfg.results}" if res.appended
                  else f"nothing appended to {cfg.results} (its line is there)")
        return 0
    if cfg.output:
        print(f"wrote {cfg.output}/metrics.json")
    if cfg.results:
        print(f"appended a line to {cfg.results}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cocorec.bench.demo import run_demo

    return run_demo(data_dir=args.data_dir, quick=True)


def cmd_score(args: argparse.Namespace) -> int:
    from cocorec.serve import load_scorer
    from cocorec.serve.scorer import dedupe, read_item_ids

    if (args.items is None) == (args.items_file is None):
        raise ConfigError("give the candidates with one of --items ID,ID,... or --items-file FILE")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.items is not None:
        raw = [i.strip() for i in args.items.split(",") if i.strip()]
        if not raw:
            raise ConfigError(f"--items {args.items!r} holds no item id: give comma-separated ids (e.g. "
                              f"--items 242,302) or --items-file FILE")
    else:
        raw = read_item_ids(args.items_file)
    items = dedupe(raw)
    if len(items) < len(raw):
        print(f"note: scoring {len(items)} distinct items ({len(raw) - len(items)} repeated ids dropped)",
              file=sys.stderr)
    scorer = load_scorer(args.run, data_dir=args.data_dir, dataset=args.dataset)
    scores = scorer.score_user(args.user, items, batch_size=args.batch_size)
    order = sorted(range(len(items)), key=lambda j: -scores[j])
    sys.stdout.writelines(f"{items[j]}\t{scores[j]:.4f}\n" for j in order)
    return 0


def _add_data_command_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["prepare", "stats"])
    _add_data_args(p)
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")


def _add_score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory written by 'cocorec train --output'")
    p.add_argument("--user", required=True, help="the dataset's own user id")
    p.add_argument("--items", default=None, help="comma-separated item ids")
    p.add_argument("--items-file", default=None,
                   help="file of candidate item ids: one a line, or Parquet with one column (repeats dropped)")
    p.add_argument("--batch-size", type=int, default=4096, help="items scored at a time (bounds memory)")
    p.add_argument("--data-dir", default=None, help="directory holding the dataset (default: the run's own)")
    p.add_argument("--dataset", default=None,
                   help="the run's dataset, if it moved (default: found from the run's checkpoint)")


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None)


def commands() -> dict[str, Command]:
    """Every subcommand: name -> (help, add its arguments, handler). The one table of the CLI."""
    from cocorec.bench.cli import add_bench_args, add_report_args, cmd_bench, cmd_report
    from cocorec.knowledge.cli import add_arguments as add_knowledge_args
    from cocorec.knowledge.cli import handler as cmd_knowledge
    from cocorec.serve.app import add_export_args, add_serve_args, cmd_export, cmd_serve

    return {
        "data": ("prepare data / show what the protocol produced", _add_data_command_args, cmd_data),
        "train": ("train and evaluate one backbone + method + seed", _add_train_args, cmd_train),
        "score": ("score candidate items for a user with a trained run (no retraining)", _add_score_args,
                  cmd_score),
        "demo": ("the main job on the embedded default (ml-100k)", _add_demo_args, cmd_demo),
        "knowledge": ("generate and inspect the LM knowledge of kar / r4ec", add_knowledge_args, cmd_knowledge),
        "bench": ("run a grid of runs (resumable), then write the report", add_bench_args, cmd_bench),
        "report": ("write the Markdown report and plots of a results file", add_report_args, cmd_report),
        "export": ("write a serving bundle of a trained run (weights, id maps, knowledge tables; no LM)",
                   add_export_args, cmd_export),
        "serve": ("serve a bundle over HTTP (FastAPI + uvicorn): /score, /recommend, /healthz, /metrics",
                  add_serve_args, cmd_serve),
    }


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cocorec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add_args, handler) in commands().items():
        p = sub.add_parser(name, help=help_)
        add_args(p)
        p.set_defaults(func=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as e:   # bad data, setting, run, LM or cache: the message names what to fix
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:   # a diverged loss: the trainer names epoch, step and the fix
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:   # disk full, permissions: the message names the file
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
