"""The trainer every backbone and knowledge method shares.

It owns fit (AdamW, early stopping on validation AUC - never on test), evaluation,
the best checkpoint (safetensors + JSON, atomic), and resume after interruption
(``last/`` holds model, method, optimizer and RNG state after every epoch).

Under ``torchrun`` the same loop trains data-parallel (:mod:`cocorec.train.distributed`): the loss
module is wrapped in DDP, each rank takes its slice of every global batch (``train.batch_size`` is
the global batch: ``batch_size / N`` per process), predictions are gathered from every rank before
any metric, and rank 0 alone writes.

Example:
    >>> from cocorec.data import prepare
    >>> from cocorec.models import build_model
    >>> from cocorec.knowledge.base import build_method
    >>> data = prepare("ml-100k")                                        # doctest: +SKIP
    >>> trainer = Trainer(build_model("din", data.spec), build_method("base"), data,
    ...                   TrainConfig(epochs=2), output_dir="runs/x")     # doctest: +SKIP
    >>> trainer.fit()["auc"] > 0.5                                        # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cocorec.config import ConfigError, RunError, check_value
from cocorec.data.errors import DataError
from cocorec.data.protocol import CTRData
from cocorec.errors import one_line
from cocorec.eval.metrics import evaluate_predictions
from cocorec.knowledge.base import KnowledgeMethod
from cocorec.train import distributed
from cocorec.utils.device import resolve_device as _resolve_device
from cocorec.utils.io import atomic_write_json, read_json, save_safetensors_atomic
from cocorec.utils.progress import progress_bar
from cocorec.utils.seed import seed_everything


@dataclass
class TrainConfig:
    """Training settings (keys mirror the trainer's behaviour one to one)."""

    epochs: int = 10
    batch_size: int = 1024
    eval_batch_size: int = 8192
    lr: float = 1e-3
    weight_decay: float = 1e-4          # on dense layers; embeddings get none
    embedding_l2: float = 0.0           # L2 penalty on the backbone's embedding tables, added to the loss
    patience: int = 2                   # epochs without val-AUC gain before stopping
    grad_clip: float = 10.0
    device: str = "auto"                # auto | cpu | cuda
    amp: bool = True                    # bf16 autocast on CUDA (ignored on CPU)
    max_steps_per_epoch: int | None = None
    threads: int | None = None          # torch CPU threads (None: torch default)
    # torch.use_deterministic_algorithms (warn_only) + CUBLAS_WORKSPACE_CONFIG=:4096:8 on CUDA: the
    # same seed on the same device gives the same run. Free on the CPU (bit-identical metrics there);
    # its cost on CUDA is unmeasured. Left out of the run key when on (runs before it keep their key).
    deterministic: bool = True

    # What each number must be (checked whenever a TrainConfig is made, e.g. by ``--set train.lr=-1``).
    _RULES = {"epochs": "at-least-1", "batch_size": "at-least-1", "eval_batch_size": "at-least-1",
              "lr": "positive", "weight_decay": "non-negative", "embedding_l2": "non-negative",
              "patience": "at-least-1", "grad_clip": "non-negative", "max_steps_per_epoch": "optional-at-least-1",
              "threads": "optional-at-least-1"}

    def __post_init__(self) -> None:
        for name, rule in self._RULES.items():
            check_value(f"train.{name}", getattr(self, name), rule)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}") from None


def set_deterministic(on: bool, device: torch.device) -> None:
    """``train.deterministic``: deterministic torch kernels (ops without one warn rather than fail);
    on CUDA cuBLAS also needs a fixed workspace, set before its first use in the process."""
    if on and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    # Filling every new tensor with NaN is a debugging aid the same results do not need; it made CPU
    # training ~7% slower.
    torch.utils.deterministic.fill_uninitialized_memory = False


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a device (:func:`cocorec.utils.device.resolve_device`)."""
    return _resolve_device(name, "train.device")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------- state (de)serialisation
def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{pid}/{k}"] = v
            else:
                scalars[f"{pid}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, pid, k = key.split("/", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split("/", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def load_safetensors(path: Path, hint: str = "") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a damaged or truncated one is a one-line DataError naming it (+ ``hint``)."""
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found" + (f"; {hint}" if hint else "")) from None
    except Exception as e:  # SafetensorError, OSError, ...: a truncated or foreign file
        why = one_line(e, 200)
        raise DataError(f"{path}: not a readable safetensors file ({why})" + (f"; {hint}" if hint else "")) from None


def check_finite_metrics(metrics: dict[str, Any], where: str, keys: tuple[str, ...] = ("auc", "logloss", "gauc"),
                         split_labels: np.ndarray | None = None) -> None:
    """A RunError naming the first metric of ``metrics`` that is not a finite number (NaN is never written)."""
    for k in keys:
        v = metrics.get(k)
        if v is None or not math.isfinite(float(v)):
            why = ""
            if split_labels is not None:
                n, pos = len(split_labels), int(np.sum(np.asarray(split_labels) > 0.5))
                if n == 0:
                    why = " (the split is empty)"
                elif pos in (0, n):
                    why = f" (the split's {n} samples are all {'positive' if pos else 'negative'}: one class)"
                elif k == "gauc":
                    why = " (no user of the split has both classes)"
            raise RunError(f"metric {where}.{k} is {v}{why}; nothing written")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class Objective(nn.Module):
    """The loss the trainer minimises on one batch: the method's training loss (which runs the
    backbone), the backbone's own extra loss (DIEN's) and the embedding L2. One module so that DDP
    wraps the whole forward; with one process it is called as is.

    Constructor Args:
        model: the backbone. method: the knowledge method. embedding_l2: ``train.embedding_l2``.

    Call Args:
        batch: a training batch on the device. step: the global step.

    Returns:
        ``(loss, logs)``: a scalar tensor and the float logs of its parts.

    Example:
        >>> from cocorec.models.base import random_batch                       # doctest: +SKIP
        >>> loss, logs = Objective(model, method, 0.0)(random_batch(spec), 0)   # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, method: KnowledgeMethod, embedding_l2: float = 0.0) -> None:
        super().__init__()
        self.model, self.method, self.embedding_l2 = model, method, embedding_l2

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss, logs = self.method.training_loss(self.model, batch, step)
        extra = self.model.add_loss()    # the backbone's own (DIEN's), from the forward just run
        if extra is not None:
            loss = loss + extra
            logs["backbone_aux"] = float(extra.detach())
        if self.embedding_l2:   # FuxiCTR's embedding regulariser: L2 on the embedding tables
            with torch.autocast(loss.device.type, enabled=False):
                reg = self.embedding_l2 * sum(p.float().pow(2).sum() for p in self.model.embedding_parameters())
            loss = loss + reg
            logs["embedding_l2"] = float(reg.detach())
        return loss, logs


class Trainer:
    """Fits ``model`` (a backbone) together with ``method`` (a knowledge plug-in) on ``data``."""

    def __init__(self, model: nn.Module, method: KnowledgeMethod, data: CTRData, config: TrainConfig,
                 output_dir: str | Path | None = None, quiet: bool = False, run_key: str = "", seed: int = 0) -> None:
        self.model, self.method, self.data, self.cfg = model, method, data, config
        self.seed = int(seed)   # the run's seed: data order and the RNG state at fit
        self.output_dir = Path(output_dir) if output_dir else None
        self.run_key = run_key  # identifies the run's config: resume only into the same run
        self.device = distributed.setup(resolve_device(config.device))   # cuda:LOCAL_RANK under torchrun
        self.quiet = quiet or not distributed.is_main()
        set_deterministic(config.deterministic, self.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.model.to(self.device)
        self.method.to(self.device)
        if self.quiet:
            self.method.progress = False
        with distributed.main_first():   # rank 0 fills the method's caches, the others read them
            self.method.build(self.model, data, self.output_dir)
        self.objective = distributed.wrap(Objective(model, method, config.embedding_l2), self.device)
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.epoch = 0
        self.best_auc = -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.train_seconds = 0.0
        self.samples_seen = 0
        self.optimizer = self._make_optimizer()

    # ------------------------------------------------------------------ setup
    def _make_optimizer(self) -> torch.optim.Optimizer:
        emb_ids = {id(p) for m in list(self.model.modules()) + list(self.method.modules())
                   if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
        custom = self.method.optimizer_groups()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if custom is None:
            params += [p for p in self.method.parameters() if p.requires_grad]
        seen: set[int] = set()
        decay, no_decay = [], []
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if id(p) in emb_ids or p.ndim < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        for g in custom or []:
            groups.append({"weight_decay": 0.0, **g, "params": [p for p in g["params"] if p.requires_grad]})
        return torch.optim.AdamW(groups, lr=self.cfg.lr)

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # ------------------------------------------------------------------ fit
    def fit(self) -> dict[str, Any]:
        """Train with early stopping on validation AUC; restore and return the best model's val metrics."""
        seed_everything(self.seed)
        if distributed.rank() > 0:   # other dropout draws than rank 0's (which keeps the one-process stream)
            torch.manual_seed(distributed.rank_seed(self.seed, distributed.rank()))
        self._maybe_resume()
        n_train = self.data.split("train").n
        steps = math.ceil(n_train / self.cfg.batch_size)
        if self.cfg.max_steps_per_epoch:
            steps = min(steps, self.cfg.max_steps_per_epoch)
        while self.epoch < self.cfg.epochs and self.bad_epochs < self.cfg.patience:
            self.model.train()
            self.method.train()
            self.method.on_epoch_start(self.epoch, steps)
            t0 = time.perf_counter()
            bar = progress_bar(steps, f"epoch {self.epoch + 1}/{self.cfg.epochs}", "batch", enabled=not self.quiet,
                               leave=False)
            logs_sum: dict[str, float] = {}
            n_samples = 0
            # This rank's slice of each global batch, and the weight that makes DDP's gradient average
            # the gradient of the global batch's mean loss (1 with one process).
            batches = distributed.train_batches(self.data, "train", self.cfg.batch_size, self.seed, self.epoch)
            for i, (batch, weight, b) in enumerate(batches):
                if i >= steps:
                    break
                batch = to_device(batch, self.device)
                with self._autocast():
                    loss, logs = self.objective(batch, self.step)
                loss = loss * weight
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {float(loss)} at epoch {self.epoch + 1}, step {self.step}; "
                                             f"lower train.lr or check the inputs")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.cfg.grad_clip:
                    nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                             self.cfg.grad_clip)
                self.optimizer.step()
                self.step += 1
                n_samples += b
                for k, v in logs.items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + v * b
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            bar.close()
            self.train_seconds += time.perf_counter() - t0
            logs_sum = distributed.all_sum(logs_sum)                  # over every rank's samples
            n_samples = int(distributed.all_sum({"n": n_samples})["n"])
            self.samples_seen += n_samples
            distributed.broadcast_buffers(self.model, self.method)   # rank 0's running statistics everywhere
            self.method.on_epoch_end(self.epoch)
            val = self.evaluate("val")
            check_finite_metrics(val, f"val (epoch {self.epoch + 1})", split_labels=self.data.split("val").label)
            entry = {"epoch": self.epoch + 1, "step": self.step,
                     **{f"train_{k}": v / max(n_samples, 1) for k, v in logs_sum.items()},
                     **{f"val_{k}": v for k, v in val.items() if k in ("auc", "logloss", "gauc")},
                     "seconds": round(time.perf_counter() - t0, 2)}
            self.history.append(entry)
            improved = val["auc"] > self.best_auc
            if improved:
                self.best_auc, self.best_epoch, self.bad_epochs = val["auc"], self.epoch + 1, 0
                self._best_tensors = {k: v.detach().clone() for k, v in self._tensors().items()}
                if self.output_dir:
                    self.save_checkpoint(self.output_dir / "checkpoint")
            else:
                self.bad_epochs += 1
            if not self.quiet:
                print(f"epoch {self.epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in entry.items()
                                                              if isinstance(v, float)) + (" *" if improved else ""))
            self.epoch += 1
            if self.output_dir:
                self._save_last()
        if getattr(self, "_best_tensors", None) is not None:
            self._load_tensors(self._best_tensors)
        elif self.output_dir and (self.output_dir / "checkpoint" / "model.safetensors").is_file():
            self.load_checkpoint(self.output_dir / "checkpoint")  # resumed after the last improvement
        self._best_tensors = None
        self.method.on_fit_end(self.predict)
        if self.output_dir and self.best_epoch > 0:
            self.save_checkpoint(self.output_dir / "checkpoint")  # keeps what on_fit_end decided (e.g. group guard)
        return self.evaluate("val")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, split: str, use_knowledge: bool = True, user_perm: np.ndarray | None = None,
                keep_knowledge: bool = False) -> dict[str, Any]:
        """Probabilities for every sample of ``split``; with the knowledge zeroed if not ``use_knowledge``.

        ``user_perm`` (``[n_users]``): the method reads the knowledge of user ``user_perm[u]`` for a
        sample of user ``u`` (the backbone still sees ``u``'s own features): the knowledge permuted
        across users. ``keep_knowledge``: also return the knowledge fields fed to the backbone
        (``"knowledge"``: one ``[n, width]`` array per field).

        Under torchrun every rank predicts its slice of the split and gets all of them back, in order:
        every rank returns the whole split (a collective: every rank must call it).
        """
        self.model.eval()
        self.method.eval()
        perm = torch.from_numpy(np.asarray(user_perm)) if user_perm is not None else None
        probs, fields = [], []
        rows = distributed.eval_rows(self.data.split(split).n)
        # a method that computes knowledge per batch (CoCo's k_u through the LM) makes this step minutes long
        bar = progress_bar(len(rows), f"predict {split}", "sample", leave=False,
                           enabled=not self.quiet and len(rows) > self.cfg.eval_batch_size)
        for start in range(0, len(rows), self.cfg.eval_batch_size):
            batch = to_device(self.data.batch(split, rows[start:start + self.cfg.eval_batch_size]), self.device)
            with self._autocast():
                if not use_knowledge:
                    knowledge = None
                else:
                    seen = batch if perm is None else {**batch, "user": perm.to(batch["user"].device)[batch["user"]]}
                    knowledge = self.method(seen)
                logits = self.model(batch, knowledge)
            probs.append(torch.sigmoid(logits.float()).cpu().numpy())
            if keep_knowledge and knowledge is not None:
                fields.append([k.float().cpu().numpy() for k in knowledge])
            bar.update(len(logits))
        bar.close()
        s = self.data.split(split)
        prob = distributed.all_gather_rows(np.concatenate(probs) if probs else np.zeros(0, np.float32))
        out: dict[str, Any] = {"prob": prob, "label": s.label, "user": s.user}
        if keep_knowledge:
            out["knowledge"] = [distributed.all_gather_rows(np.concatenate(f)) for f in zip(*fields)] if fields else []
        return out

    def evaluate(self, split: str, use_knowledge: bool = True, user_perm: np.ndarray | None = None) -> dict[str, float]:
        p = self.predict(split, use_knowledge, user_perm)
        return evaluate_predictions(p["label"], p["prob"], p["user"])

    # ------------------------------------------------------------------ checkpoints
    def _tensors(self) -> dict[str, torch.Tensor]:
        t = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        t.update({f"method/{k}": v for k, v in self.method.checkpoint_state().items()})
        return t

    def save_checkpoint(self, directory: Path) -> None:
        """Best model: weights (safetensors) + a self-describing config (JSON), both atomic (rank 0 alone)."""
        if not distributed.is_main():
            return
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(self._tensors(), directory / "model.safetensors",
                                metadata={"run_key": self.run_key, "epoch": str(self.epoch + 1)})
        atomic_write_json(directory / "trainer.json", {"epoch": self.epoch + 1, "val_auc": _finite(self.best_auc),
                                                       "run_key": self.run_key})

    def load_checkpoint(self, directory: Path) -> None:
        tensors = load_safetensors(directory / "model.safetensors",
                                   hint=f"the best checkpoint is damaged: remove {directory} and rerun to retrain")
        self._load_tensors(tensors)

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        method_sd = {k[len("method/"):]: v for k, v in tensors.items() if k.startswith("method/")}
        self.model.load_state_dict(model_sd)
        self.method.load_checkpoint_state({k: v.to(self.device) for k, v in method_sd.items()})
        self.model.to(self.device)

    def _save_last(self) -> None:
        """``last/``: what resuming needs. Every rank's RNG state (``rng/torch`` is rank 0's,
        ``rng/torch/R`` rank R's); rank 0 writes (a collective: every rank calls it)."""
        assert self.output_dir is not None
        rng = distributed.gather_rng_states()
        if not distributed.is_main():
            return
        d = self.output_dir / "last"
        d.mkdir(parents=True, exist_ok=True)
        tensors = self._tensors()
        opt_t, opt_meta = _flatten_optimizer(self.optimizer)
        tensors.update(opt_t)
        tensors["rng/torch"] = rng[0]
        tensors.update({f"rng/torch/{r}": state for r, state in enumerate(rng) if r > 0})
        save_safetensors_atomic(tensors, d / "state.safetensors")
        atomic_write_json(d / "state.json", {
            "run_key": self.run_key, "epoch": self.epoch, "step": self.step, "best_auc": _finite(self.best_auc),
            "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "history": self.history,
            "train_seconds": self.train_seconds, "samples_seen": self.samples_seen, "optimizer": opt_meta,
            "config": asdict(self.cfg), "data_key": self.data.key})

    def _maybe_resume(self) -> None:
        if not self.output_dir:
            return
        d = self.output_dir / "last"
        if not (d / "state.json").is_file() or not (d / "state.safetensors").is_file():
            return
        hint = f"remove {d} to restart the run from its first epoch"
        try:
            meta = read_json(d / "state.json")
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{d / 'state.json'}: not valid JSON ({e}); {hint}") from None
        if not isinstance(meta, dict) or meta.get("run_key") != self.run_key:
            if not self.quiet:
                print(f"note: {d} belongs to a different configuration; starting fresh")
            return
        if meta.get("data_key") not in (None, self.data.key):   # older states carry no data key
            raise RunError(f"{d} was written on other data (data key {meta['data_key']}, now {self.data.key}: "
                           f"the dataset's files or spec changed); {hint}, or pass --overwrite")
        tensors = load_safetensors(d / "state.safetensors", hint=hint)
        self._load_tensors(tensors)
        self.optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        # this rank's own state; a rank the saving run did not have continues rank 0's
        torch.set_rng_state(tensors.get(f"rng/torch/{distributed.rank()}", tensors["rng/torch"]))
        self.epoch, self.step = meta["epoch"], meta["step"]
        best = meta["best_auc"]
        self.best_auc = -math.inf if best is None else best   # None: no epoch improved yet (-inf is not JSON)
        self.best_epoch, self.bad_epochs = meta["best_epoch"], meta["bad_epochs"]
        self.history, self.train_seconds = meta["history"], meta["train_seconds"]
        self.samples_seen = meta["samples_seen"]
        if not self.quiet:
            print(f"resumed from {d} at epoch {self.epoch} (best val AUC {self.best_auc:.4f})")

    def summary(self) -> dict[str, Any]:
        return {"epochs_run": self.epoch, "best_epoch": self.best_epoch, "steps": self.step,
                "train_seconds": round(self.train_seconds, 2),
                "samples_per_s": round(self.samples_seen / self.train_seconds, 1) if self.train_seconds else None,
                "history": self.history}
