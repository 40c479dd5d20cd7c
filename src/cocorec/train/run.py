"""One full run: data -> backbone + method -> fit -> evaluate -> metrics.json + a results line.

Runs are never lost. Before any data is read the settings are checked and the output directory and
results file must be writable; then the output directory decides: empty (train), this run interrupted
(resume from ``last/``), this run finished (nothing is rerun, rewritten or appended; only a results
line it lacks is restored), another configuration's run (refused; ``overwrite=True`` / ``--overwrite``
replaces it). metrics.json and the results line are strict JSON: a NaN metric is an error naming it.

Under ``torchrun --nproc_per_node=N -m cocorec train ...`` every process runs this same function
(:mod:`cocorec.train.distributed`): each checks and reads alike, rank 0 prepares the data first,
all train and evaluate together, and rank 0 alone writes; the others wait for it at a barrier.

Example:
    >>> cfg = RunConfig(dataset="ml-100k", backbone="din", method="base", seed=0, output="runs/din")
    >>> metrics = run(cfg)                                   # doctest: +SKIP
    >>> sorted(metrics)                                      # doctest: +SKIP
    ['config', 'diagnostics', 'groups', 'test', 'train', 'val']
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cocorec.config import ConfigError, RunError, apply_overrides, check_kwargs
from cocorec.data.protocol import PROTOCOL_VERSION, CTRData, ProtocolConfig, prepare
from cocorec.errors import one_line
from cocorec.eval.knowledge import knowledge_report, user_derangement
from cocorec.eval.metrics import evaluate_predictions, group_metrics
from cocorec.knowledge.base import METHODS, build_method, check_method_args, import_methods, method_label
from cocorec.models import MODELS, build_model
from cocorec.train import distributed
from cocorec.train.trainer import TrainConfig, Trainer, check_finite_metrics, resolve_device
from cocorec.utils.device import cpu_model, native_bf16
from cocorec.utils.io import atomic_write_json, key_of, nonfinite_to_none, read_json, strict_json_dumps, to_jsonable
from cocorec.utils.seed import seed_everything

DEFAULT_RESULTS = "runs/results.jsonl"


@dataclass
class RunConfig:
    """Everything that defines a run. ``model`` / ``method_args`` mirror constructor arguments."""

    dataset: str = "ml-100k"
    backbone: str = "din"
    method: str = "base"
    seed: int = 0
    output: str | None = None
    data_dir: str | None = None
    download: bool = False
    results: str | None = DEFAULT_RESULTS
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: dict[str, Any] = field(default_factory=dict)        # backbone constructor kwargs
    method_args: dict[str, Any] = field(default_factory=dict)  # method constructor kwargs
    quiet: bool = False
    label_keys: tuple[str, ...] = ()   # method settings named in the run's label (a grid entry's own settings)
    overwrite: bool = False            # replace a run of another configuration (or a finished one) in ``output``

    def with_overrides(self, sections: dict[str, dict[str, str]]) -> "RunConfig":
        """Apply ``section.key=value`` overrides; unknown sections/keys and wrong types are rejected."""
        cfg = self
        for section, kv in sections.items():
            if section == "train":
                cfg = _replace(cfg, train=apply_overrides(cfg.train, kv))
            elif section == "protocol":
                cfg = _replace(cfg, protocol=apply_overrides(cfg.protocol, kv))
            elif section == "model":
                cls = MODELS.get(cfg.backbone)
                if cls is None:
                    raise ConfigError(_one_of("backbone", cfg.backbone, sorted(MODELS)))
                cfg = _replace(cfg, model={**cfg.model, **check_kwargs(cls, kv, f"backbone {cfg.backbone}")})
            elif section == "method":
                import_methods()
                factory = METHODS.get(cfg.method)
                if factory is None:
                    raise ConfigError(_one_of("method", cfg.method, sorted(METHODS)))
                args = check_kwargs(factory, kv, f"method {cfg.method}")
                cfg = _replace(cfg, method_args={**cfg.method_args, **args})
                check_method_args(cfg.method, cfg.method_args)   # e.g. a bad source: an error before any data
            else:
                raise ConfigError(f"unknown config section {section!r} (use train., protocol., model., method.)")
        return cfg

    def key(self) -> str:
        """Identity of the run's configuration (output/results paths and verbosity excluded; settings
        added later are left out at their default, so the runs recorded before them keep their key)."""
        d = asdict(self)
        for k in ("output", "results", "quiet", "data_dir", "download", "label_keys", "overwrite"):
            d.pop(k)
        for k, default in _TRAIN_KEYS_ADDED.items():
            if d["train"].get(k) == default:
                d["train"].pop(k)
        d["protocol_version"] = PROTOCOL_VERSION    # a run on data processed otherwise is another run
        return key_of(d)

    def method_label(self) -> str:
        """The method as reports name it: ``kar``, ``kar[source=oracle]`` (see :func:`method_label`)."""
        return method_label(self.method, self.method_args, self.label_keys)


#: TrainConfig settings added after runs were recorded, with the default that reproduces those runs.
_TRAIN_KEYS_ADDED: dict[str, Any] = {"deterministic": True}


def _replace(cfg: RunConfig, **kw: Any) -> RunConfig:
    from dataclasses import replace
    return replace(cfg, **kw)


def git_sha() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except Exception:
        return "unknown"


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """Where a run ran (goes into every results line: figures from different machines differ)."""
    dev = torch.device(device)
    info: dict[str, Any] = {"device": str(dev), "cpu": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version()}
    if dev.type == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(dev)
    else:   # which CPU, and whether it runs bf16 natively (what lm_dtype=auto picks there)
        info["cpu_model"], info["native_bf16"] = cpu_model(), native_bf16(dev)
    if distributed.world_size() > 1:   # a torchrun run: its processes (one device each)
        info["processes"] = distributed.world_size()
    return info


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def append_result(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line (a single write, so concurrent runs do not interleave lines)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    line = strict_json_dumps(record, str(p), sort_keys=False) + "\n"   # NaN is not JSON: refused
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def _one_of(name: str, value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=1)
    return f"unknown {name} {value!r}" + (f" (did you mean {close[0]!r}?)" if close else "") + \
        f"; one of {', '.join(choices)}"


def validate(cfg: RunConfig) -> None:
    """Every check that needs no data: backbone, method and its settings, seed (TrainConfig checks its own)."""
    if not cfg.dataset:
        raise ConfigError("the dataset is empty: give --dataset ml-100k, ml-1m-3k or a generic-format directory")
    if cfg.backbone not in MODELS:
        raise ConfigError(_one_of("backbone", cfg.backbone, sorted(MODELS)))
    import_methods()
    if cfg.method not in METHODS:
        raise ConfigError(_one_of("method", cfg.method, sorted(METHODS)))
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed must be an integer from 0 to 2**32 - 1, got {cfg.seed!r}")
    check_method_args(cfg.method, cfg.method_args)   # e.g. a bad source: an error before any data
    resolve_device(cfg.train.device)                  # cuda asked for where there is none
    distributed.check_supported(METHODS[cfg.method], cfg.method)   # torchrun with a method that cannot


# ----------------------------------------------------------------------------- the output directory
def _nearest_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_dir(d: Path, what: str, fix: str) -> None:
    """Create and remove a file in ``d``: the only test of writability that also holds for root, ACLs
    and read-only mounts."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cocorec-write-test-", dir=d)
    except OSError as e:
        raise RunError(f"{what} is not writable: cannot create a file in {d} ({e.strerror or e}); {fix}") from None
    os.close(fd)
    os.unlink(tmp)


def check_writable(output: str | os.PathLike | None, results: str | os.PathLike | None) -> None:
    """A RunError unless the output directory and the results file can be written (checked before any work)."""
    if output:
        out = Path(output)
        what, fix = f"output directory {out}", "choose another --output or fix its permissions"
        if out.exists() and not out.is_dir():
            raise RunError(f"{what}: {out} exists and is not a directory; choose another --output")
        base = _nearest_existing(out)
        if not base.is_dir():
            raise RunError(f"{what}: {base} is a file, not a directory; choose another --output")
        _probe_dir(base, what, fix)
        for sub in ("checkpoint", "last"):
            if (out / sub).is_dir():
                _probe_dir(out / sub, what, fix)
    if results:
        r = Path(results)
        what, fix = f"results file {r}", "choose another --results or fix its permissions"
        if r.is_dir():
            raise RunError(f"{what} is a directory, not a file; choose another --results")
        if r.exists():
            try:
                with open(r, "ab"):
                    pass
            except OSError as e:
                raise RunError(f"{what} is not writable ({e.strerror or e}); {fix}") from None
        else:
            base = _nearest_existing(r.parent)
            if not base.is_dir():
                raise RunError(f"{what}: {base} is a file, not a directory; choose another --results")
            _probe_dir(base, what, fix)


@dataclass
class OutputState:
    """What an output directory holds for a run about to start there."""

    kind: str                          # new | resume | finished | replace
    metrics: dict[str, Any] | None = None   # ``finished``: the run's metrics.json


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _config_diff(old: dict[str, Any], cfg: RunConfig, limit: int = 3) -> str:
    """The settings in which the run found in a directory differs from ``cfg`` (``train.lr 0.001 -> 0.01``)."""
    new = to_jsonable({"dataset": cfg.dataset, "backbone": cfg.backbone, "method": cfg.method, "seed": cfg.seed,
                       "protocol": asdict(cfg.protocol), "train": asdict(cfg.train), "model": cfg.model,
                       "method_args": cfg.method_args})
    old = to_jsonable({k: old[k] for k in new if k in old})
    new = {k: v for k, v in new.items() if k in old}
    a, b = _flat(old), _flat(new)
    diffs = []
    for k in sorted(set(a) | set(b), key=lambda k: (k not in a or k not in b, k.count("."), k)):
        va, vb = a.get(k, "(unset)"), b.get(k, "(unset)")
        if json.dumps(va, sort_keys=True) != json.dumps(vb, sort_keys=True):
            diffs.append(f"{k.replace('method_args.', 'method.')} {json.dumps(va)} -> {json.dumps(vb)}")
    if not diffs:
        return "the run keys differ"
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "it differs in " + ", ".join(diffs[:limit]) + more


def inspect_output(cfg: RunConfig) -> OutputState:
    """What ``cfg.output`` holds: nothing (new), this run interrupted (resume), this run finished
    (finished), or - with ``cfg.overwrite`` - anything to replace. Another configuration's run, finished
    or not, is a RunError: runs are never overwritten by accident."""
    if not cfg.output:
        return OutputState("new")
    out = Path(cfg.output)
    metrics_p, state_p = out / "metrics.json", out / "last" / "state.json"
    trainer_p = out / "checkpoint" / "trainer.json"
    if not any(p.exists() for p in (metrics_p, state_p, trainer_p)):
        return OutputState("new")
    if cfg.overwrite:
        return OutputState("replace")
    fix = f"use another --output, or pass --overwrite to replace the run in {out}"
    found = metrics_p if metrics_p.exists() else state_p if state_p.exists() else trainer_p
    try:
        stored = read_json(found)
        old_key = stored["config"]["run_key"] if found == metrics_p else stored["run_key"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"no {e} field" if isinstance(e, KeyError) else one_line(e, 120)
        raise RunError(f"{found}: unreadable ({why}), so which run {out} holds is unknown; {fix}") from None
    key = cfg.key()
    if old_key == key:
        return OutputState("finished", stored) if found == metrics_p else OutputState("resume")
    if found == metrics_p:
        old, what = stored["config"], "a finished run"
    elif found == state_p:
        old = {"train": stored.get("config") or {}}
        what = f"an unfinished run (stopped after epoch {stored.get('epoch')})"
    else:
        old, what = {}, "an unfinished run"
    raise RunError(f"output directory {out} holds {what} of another configuration ({_config_diff(old, cfg)}); "
                   f"{fix}")


def _clear_run(out: Path) -> None:
    """Remove a run's own files (the completion marker first), for ``--overwrite``."""
    (out / "metrics.json").unlink(missing_ok=True)
    for sub in ("checkpoint", "last"):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)


def check_splits(data: CTRData) -> None:
    """AUC needs both classes: a one-class or empty val/test split is an error before any training."""
    for name in ("val", "test"):
        y = data.split(name).label
        n, pos = len(y), int((y > 0.5).sum())
        if n == 0:
            raise RunError(f"the {name} split is empty: nothing to evaluate; nothing trained")
        if pos in (0, n):
            raise RunError(f"the {name} split's {n} samples are all {'positive' if pos else 'negative'}: AUC is "
                           f"undefined with one class; nothing trained")


# ----------------------------------------------------------------------------- results lines
def results_record(metrics: dict[str, Any], output: str | None) -> dict[str, Any]:
    """The results line of a finished run, from its metrics alone (so a lost line can be restored)."""
    c, tr = metrics["config"], metrics["train"]
    return {
        "time": tr.get("finished") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": tr.get("git_sha") or git_sha(),
        "dataset": c["dataset"], "backbone": c["backbone"], "method": c["method"], "variant": c["variant"],
        "split_seed": c["protocol"]["split_seed"], "seed": c["seed"], "run_key": c["run_key"], "output": output,
        "config": c, "metrics": {k: metrics.get(k) for k in ("val", "test", "test_no_knowledge",
                                                              "test_knowledge_permuted")},
        "groups": metrics["groups"], "diagnostics": metrics["diagnostics"], "machine": tr["machine"],
        "cost": {k: tr.get(k) for k in ("wall_seconds", "train_seconds", "samples_per_s", "peak_memory_mb")}}


def has_result_line(results: str | os.PathLike, run_key: str, output: str | None) -> bool:
    """Whether ``results`` holds a line of the run ``run_key`` written to ``output``."""
    p = Path(results)
    if not p.is_file():
        return False
    want = os.path.abspath(output) if output else None
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            if run_key not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or rec.get("run_key") != run_key:
                continue
            o = rec.get("output")
            if o == output or (o and want and os.path.abspath(o) == want):
                return True
    return False


@dataclass
class RunResult:
    """What :func:`execute` did: ``trained`` (and wrote), or ``done`` (the output held this finished run)."""

    metrics: dict[str, Any]
    status: str
    appended: bool      # a line was appended to the results file (for ``done``: a missing line restored)


def run(cfg: RunConfig, data: CTRData | None = None) -> dict[str, Any]:
    """Train and evaluate one (dataset, backbone, method, seed); write metrics.json; append a results line.

    A finished identical run in ``cfg.output`` is not run again: its metrics are returned (see :func:`execute`).
    """
    res = execute(cfg, data)
    if res.status == "done" and not cfg.quiet:
        print(f"note: {cfg.output} already holds this finished run (run key {cfg.key()}); nothing rerun")
    return res.metrics


def execute(cfg: RunConfig, data: CTRData | None = None) -> RunResult:
    """:func:`run`, telling what it did. In order, before any data is loaded: the configuration is checked,
    the output directory and results file must be writable, and the output directory must hold nothing, this
    run interrupted (it resumes from ``last/``), this run finished (nothing is rerun or rewritten; a results
    line it lacks is restored) or - only with ``cfg.overwrite`` - a run to replace."""
    t_start = time.perf_counter()
    validate(cfg)
    distributed.setup(resolve_device(cfg.train.device))   # under torchrun: join the other processes
    check_writable(cfg.output, cfg.results)
    state = inspect_output(cfg)
    out = Path(cfg.output) if cfg.output else None
    if state.kind == "finished":
        return _finished(cfg, state, data)
    method = build_method(cfg.method, seed=cfg.seed, **cfg.method_args)   # bad settings fail before the data
    if data is None:
        with distributed.main_first():   # rank 0 fills the processed-data cache, the others read it
            data = prepare(cfg.dataset, cfg.protocol, data_dir=cfg.data_dir, download=cfg.download)
    check_splits(data)
    seed_everything(cfg.seed)   # every rank draws the same initial weights (DDP also copies rank 0's)
    method.bind(data.spec)
    # Methods with knowledge know their field sizes only after they are built (and bound to the data).
    model = build_model(cfg.backbone, data.spec, knowledge_dims=method.knowledge_dims, **cfg.model)
    if out is not None and state.kind == "replace" and distributed.is_main():
        _clear_run(out)
    distributed.barrier()   # no rank looks for last/ before rank 0 cleared a replaced run
    trainer = Trainer(model, method, data, cfg.train, output_dir=out, quiet=cfg.quiet, run_key=cfg.key(),
                      seed=cfg.seed)
    val = trainer.fit()
    check_finite_metrics(val, "val", split_labels=data.split("val").label)
    metrics = _evaluate(cfg, trainer, data, val)
    summary = trainer.summary()
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    summary["peak_memory_mb"] = round(peak_memory_mb(), 1)
    summary["machine"] = machine_info(trainer.device)
    summary["git_sha"] = git_sha()
    summary["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    metrics["train"] = summary
    metrics["config"] = {"dataset": cfg.dataset, "backbone": cfg.backbone, "method": cfg.method,
                         "variant": cfg.method_label(), "seed": cfg.seed,
                         "run_key": cfg.key(), "data_key": data.key, "protocol": asdict(cfg.protocol),
                         "train": asdict(cfg.train), "model": cfg.model, "method_args": cfg.method_args,
                         "method_config": method.config_dict()}
    _write(cfg, out, metrics, data, method.knowledge_dims)
    return RunResult(metrics, "trained", bool(cfg.results) and distributed.is_main())


def _finished(cfg: RunConfig, state: OutputState, data: CTRData | None) -> RunResult:
    """The output directory holds this run, finished: report it (on the same data only); restore its
    results line if that was lost; rerun and rewrite nothing."""
    out = Path(cfg.output or "")
    assert state.metrics is not None
    if data is None:
        data = prepare(cfg.dataset, cfg.protocol, data_dir=cfg.data_dir, download=cfg.download)
    old_key = state.metrics["config"].get("data_key")
    if old_key != data.key:
        raise RunError(f"output directory {out} holds a finished run of this configuration on other data (data "
                       f"key {old_key}, now {data.key}: the dataset's files changed); use another --output, or "
                       f"pass --overwrite to replace it")
    appended = False
    if cfg.results and distributed.is_main() and not has_result_line(cfg.results, cfg.key(), cfg.output):
        append_result(cfg.results, results_record(state.metrics, cfg.output))
        appended = True
    distributed.barrier()
    return RunResult(state.metrics, "done", appended)


def _evaluate(cfg: RunConfig, trainer: Trainer, data: CTRData, val: dict[str, Any]) -> dict[str, Any]:
    """Test metrics (overall and per group) of the fitted run; for a method with knowledge, the same
    model with the knowledge zeroed and permuted across test users, and the knowledge diagnostics."""
    method, model = trainer.method, trainer.model
    test_pred = trainer.predict("test", keep_knowledge=True)
    test = evaluate_predictions(test_pred["label"], test_pred["prob"], test_pred["user"])
    check_finite_metrics(test, "test", split_labels=test_pred["label"])
    metrics: dict[str, Any] = {"val": val, "test": test}
    metrics["groups"] = {"test": group_metrics(test_pred["label"], test_pred["prob"], test_pred["user"],
                                               {**data.user_groups, **method.user_groups()})}
    diagnostics = method.diagnostics()
    if method.knowledge_dims:
        # The same model without knowledge (zeroed fields), and with every test user reading another
        # test user's knowledge: what the knowledge contributes, and what of it is about the user.
        p0 = trainer.predict("test", use_knowledge=False)
        metrics["test_no_knowledge"] = evaluate_predictions(p0["label"], p0["prob"], p0["user"])
        check_finite_metrics(metrics["test_no_knowledge"], "test_no_knowledge")
        if method.user_groups():   # e.g. corrupted vs clean users: the knowledge's effect inside each
            metrics["groups"]["test_no_knowledge"] = group_metrics(p0["label"], p0["prob"], p0["user"],
                                                                   method.user_groups())
        perm = user_derangement(data.n_users, data.split_users("test"), cfg.seed)
        metrics["test_knowledge_permuted"] = trainer.evaluate("test", user_perm=perm)
        check_finite_metrics(metrics["test_knowledge_permuted"], "test_knowledge_permuted")
        diagnostics["knowledge"] = _knowledge_diagnostics(model, method, test_pred)
    # A group's AUC with one class in it, a variance share of a constant: undefined, written as null.
    metrics["groups"] = nonfinite_to_none(metrics["groups"])
    metrics["diagnostics"] = nonfinite_to_none(diagnostics)
    return metrics


def _write(cfg: RunConfig, out: Path | None, metrics: dict[str, Any], data: CTRData,
           knowledge_dims: list[int]) -> None:
    """Checkpoint config, then metrics.json (the mark of a finished run), then the results line: a run
    killed in between is resumed (no metrics.json) or has its missing line restored (see execute). A NaN
    anywhere is an error naming it, before anything is written."""
    record = results_record(metrics, str(out) if out else None)
    try:
        strict_json_dumps(record, "the run's results")
    except ValueError as e:
        raise RunError(str(e)) from None
    if not distributed.is_main():   # under torchrun rank 0 alone writes; the others wait for it
        distributed.barrier()
        return
    if out:
        c = metrics["config"]
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "checkpoint" / "config.json", {
            "format": "cocorec-checkpoint-v1", "backbone": cfg.backbone, "method": cfg.method, "seed": cfg.seed,
            "spec": asdict(data.spec), "model": cfg.model, "method_args": cfg.method_args,
            "method_config": c["method_config"], "dataset": cfg.dataset, "data_key": data.key,
            "dataset_path": _dataset_path(cfg.dataset),
            "data_dir": os.path.abspath(cfg.data_dir) if cfg.data_dir else None,
            "protocol": asdict(cfg.protocol), "knowledge_dims": knowledge_dims,
            "git_sha": metrics["train"]["git_sha"], "val": metrics["val"], "test": metrics["test"]})
        atomic_write_json(out / "metrics.json", metrics)
    if cfg.results:
        append_result(cfg.results, record)
    distributed.barrier()


def _dataset_path(dataset: str) -> str | None:
    """The absolute path of a generic-format dataset directory (None for a built-in dataset name): a run
    trained with a relative path is found again from any working directory."""
    from cocorec.data.raw import BUILTIN

    if dataset in BUILTIN or not Path(dataset).is_dir():
        return None
    return os.path.abspath(dataset)


@torch.no_grad()
def _knowledge_diagnostics(model: Any, method: Any, pred: dict[str, Any]) -> dict[str, Any]:
    """Variance shares of the test split's knowledge fields, as the method outputs them and after the
    backbone's knowledge projection (:func:`cocorec.eval.knowledge.knowledge_report`)."""
    fields = pred.get("knowledge") or []
    projected = []
    for proj, k in zip(model.knowledge_proj, fields):
        w = proj.weight.detach().float().cpu().numpy()
        b = proj.bias.detach().float().cpu().numpy() if proj.bias is not None else 0.0
        projected.append(k @ w.T + b)
    names = list(getattr(method, "knowledge_names", None) or [f"field{i}" for i in range(len(fields))])
    return knowledge_report(fields, projected, pred["user"], names)
