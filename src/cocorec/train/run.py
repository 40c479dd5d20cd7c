"""One full run: data -> backbone + method -> fit -> evaluate -> metrics.json + a results line.

Example:
    >>> cfg = RunConfig(dataset="ml-100k", backbone="din", method="base", seed=0, output="runs/din")
    >>> metrics = run(cfg)                                   # doctest: +SKIP
    >>> sorted(metrics)                                      # doctest: +SKIP
    ['config', 'diagnostics', 'groups', 'test', 'train', 'val']
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cocorec.config import ConfigError, apply_overrides, check_kwargs
from cocorec.data.protocol import PROTOCOL_VERSION, CTRData, ProtocolConfig, prepare
from cocorec.eval.knowledge import knowledge_report, user_derangement
from cocorec.eval.metrics import evaluate_predictions, group_metrics
from cocorec.knowledge.base import METHODS, build_method, check_method_args, import_methods, method_label
from cocorec.models import MODELS, build_model
from cocorec.train.trainer import TrainConfig, Trainer
from cocorec.utils.io import atomic_write_json, key_of, to_jsonable
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
                    raise ConfigError(f"unknown backbone {cfg.backbone!r}")
                cfg = _replace(cfg, model={**cfg.model, **check_kwargs(cls, kv, f"backbone {cfg.backbone}")})
            elif section == "method":
                import_methods()
                factory = METHODS.get(cfg.method)
                if factory is None:
                    raise ConfigError(f"unknown method {cfg.method!r}; one of {sorted(METHODS)}")
                cfg = _replace(cfg, method_args={**cfg.method_args, **check_kwargs(factory, kv, f"method {cfg.method}")})
                check_method_args(cfg.method, cfg.method_args)   # e.g. a bad source: an error before any data
            else:
                raise ConfigError(f"unknown config section {section!r} (use train., protocol., model., method.)")
        return cfg

    def key(self) -> str:
        """Identity of the run's configuration (output/results paths and verbosity excluded)."""
        d = asdict(self)
        for k in ("output", "results", "quiet", "data_dir", "download", "label_keys"):
            d.pop(k)
        d["protocol_version"] = PROTOCOL_VERSION    # a run on data processed otherwise is another run
        return key_of(d)

    def method_label(self) -> str:
        """The method as reports name it: ``kar``, ``kar[source=oracle]`` (see :func:`method_label`)."""
        return method_label(self.method, self.method_args, self.label_keys)


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
    return info


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def append_result(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line (a single write, so concurrent runs do not interleave lines)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(to_jsonable(record), sort_keys=False) + "\n"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def run(cfg: RunConfig, data: CTRData | None = None) -> dict[str, Any]:
    """Train and evaluate one (dataset, backbone, method, seed); write metrics.json; append a results line."""
    t_start = time.perf_counter()
    check_method_args(cfg.method, cfg.method_args)
    method = build_method(cfg.method, seed=cfg.seed, **cfg.method_args)   # bad settings fail before the data
    if data is None:
        data = prepare(cfg.dataset, cfg.protocol, data_dir=cfg.data_dir, download=cfg.download)
    seed_everything(cfg.seed)
    train_cfg = cfg.train
    method.bind(data.spec)
    # Methods with knowledge know their field sizes only after they are built (and bound to the data).
    model = build_model(cfg.backbone, data.spec, knowledge_dims=method.knowledge_dims, **cfg.model)
    out = Path(cfg.output) if cfg.output else None
    trainer = Trainer(model, method, data, train_cfg, output_dir=out, quiet=cfg.quiet, run_key=cfg.key(),
                      seed=cfg.seed)
    val = trainer.fit()
    test_pred = trainer.predict("test", keep_knowledge=True)
    test = evaluate_predictions(test_pred["label"], test_pred["prob"], test_pred["user"])
    metrics: dict[str, Any] = {"val": val, "test": test}
    metrics["groups"] = {"test": group_metrics(test_pred["label"], test_pred["prob"], test_pred["user"],
                                               {**data.user_groups, **method.user_groups()})}
    diagnostics = method.diagnostics()
    if method.knowledge_dims:
        # The same model without knowledge (zeroed fields), and with every test user reading another
        # test user's knowledge: what the knowledge contributes, and what of it is about the user.
        p0 = trainer.predict("test", use_knowledge=False)
        metrics["test_no_knowledge"] = evaluate_predictions(p0["label"], p0["prob"], p0["user"])
        if method.user_groups():   # e.g. corrupted vs clean users: the knowledge's effect inside each
            metrics["groups"]["test_no_knowledge"] = group_metrics(p0["label"], p0["prob"], p0["user"],
                                                                   method.user_groups())
        perm = user_derangement(data.n_users, data.split_users("test"), cfg.seed)
        metrics["test_knowledge_permuted"] = trainer.evaluate("test", user_perm=perm)
        diagnostics["knowledge"] = _knowledge_diagnostics(model, method, test_pred)
    metrics["diagnostics"] = diagnostics
    summary = trainer.summary()
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    summary["peak_memory_mb"] = round(peak_memory_mb(), 1)
    summary["machine"] = machine_info(trainer.device)
    metrics["train"] = summary
    metrics["config"] = {"dataset": cfg.dataset, "backbone": cfg.backbone, "method": cfg.method,
                         "variant": cfg.method_label(), "seed": cfg.seed,
                         "run_key": cfg.key(), "data_key": data.key, "protocol": asdict(cfg.protocol),
                         "train": asdict(train_cfg), "model": cfg.model, "method_args": cfg.method_args,
                         "method_config": method.config_dict()}
    if out:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "metrics.json", metrics)
        atomic_write_json(out / "checkpoint" / "config.json", {
            "format": "cocorec-checkpoint-v1", "backbone": cfg.backbone, "method": cfg.method,
            "spec": asdict(data.spec), "model": cfg.model, "method_args": cfg.method_args,
            "method_config": method.config_dict(), "dataset": cfg.dataset, "data_key": data.key,
            "protocol": asdict(cfg.protocol), "knowledge_dims": method.knowledge_dims, "git_sha": git_sha(),
            "val": val, "test": test})
    if cfg.results:
        append_result(cfg.results, {
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git_sha": git_sha(),
            "dataset": cfg.dataset, "backbone": cfg.backbone, "method": cfg.method, "variant": cfg.method_label(),
            "split_seed": cfg.protocol.split_seed, "seed": cfg.seed, "run_key": cfg.key(),
            "output": str(out) if out else None,
            "config": metrics["config"], "metrics": {"val": val, "test": test,
                                                    "test_no_knowledge": metrics.get("test_no_knowledge"),
                                                    "test_knowledge_permuted": metrics.get("test_knowledge_permuted")},
            "groups": metrics["groups"], "diagnostics": metrics["diagnostics"],
            "machine": summary["machine"],
            "cost": {k: summary[k] for k in ("wall_seconds", "train_seconds", "samples_per_s", "peak_memory_mb")}})
    return metrics


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
