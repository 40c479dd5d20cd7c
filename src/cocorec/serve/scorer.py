"""Load a trained run directory (``checkpoint/config.json`` + ``model.safetensors``) and score.

The checkpoint is self-describing: backbone name and arguments, method name and arguments,
the feature spec and the processed-data key. KAR's vectors travel in the checkpoint (scoring costs
the backbone plus one lookup); CoCo recomputes k_u with its LM and its LoRA from the checkpoint (the
user-text cache is built on first use), so scoring a CoCo run loads the LM.

Example:
    >>> scorer = load_scorer("runs/demo/din-base-0")                       # doctest: +SKIP
    >>> scorer.score_user("196", ["242", "302"])                           # doctest: +SKIP
    array([0.71, 0.43], dtype=float32)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cocorec.data.errors import DataError
from cocorec.data.protocol import CTRData, FeatureSpec, ProtocolConfig, prepare
from cocorec.errors import one_line
from cocorec.knowledge.base import KnowledgeMethod, build_method
from cocorec.models import BaseModel, build_model
from cocorec.train.trainer import load_safetensors
from cocorec.utils.io import read_json


class Scorer:
    """A trained backbone + a knowledge method built on it (:meth:`KnowledgeMethod.build`), in eval mode."""

    def __init__(self, model: BaseModel, method: KnowledgeMethod, config: dict[str, Any],
                 data: CTRData | None = None) -> None:
        self.model, self.method, self.config, self.data = model.eval(), method.eval(), config, data

    @torch.no_grad()
    def score_batch(self, batch: dict[str, torch.Tensor], use_knowledge: bool = True) -> np.ndarray:
        knowledge = self.method(batch) if use_knowledge else None
        return torch.sigmoid(self.model(batch, knowledge).float()).numpy()

    def score_split(self, split: str, batch_size: int = 8192, use_knowledge: bool = True) -> np.ndarray:
        if self.data is None:
            raise ValueError("score_split needs the processed data (load_scorer(..., data=...))")
        return np.concatenate([self.score_batch(b, use_knowledge) for b in self.data.batches(split, batch_size)])

    def score_user(self, user_id: str, item_ids: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Scores of candidate items for a known user, with the user's latest behaviour as history.

        ``batch_size``: score that many items at a time (memory bounded by the batch, not by the number
        of candidates); None scores them in one batch.
        """
        data = self.data
        if data is None:
            raise ValueError("score_user needs the processed data")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        try:
            u = data.user_ids.index(str(user_id))
        except ValueError:
            raise DataError(f"unknown user id {user_id!r}") from None
        item_index = {iid: i + 1 for i, iid in enumerate(data.item_ids)}
        missing = [i for i in item_ids if str(i) not in item_index]
        if missing:
            raise DataError(f"unknown item id(s) {missing[:5]}" + (f" ({len(missing)} of {len(item_ids)})"
                                                                   if len(missing) > 5 else ""))
        # The user's most recent interactions: the last sample's history plus that sample's item.
        T = data.spec.max_hist_len
        hist_i, hist_r = _latest_history(data, u, T)
        index = np.fromiter((item_index[str(i)] for i in item_ids), dtype=np.int64, count=len(item_ids))
        step = batch_size or max(len(index), 1)
        out = [self._score_items(data, u, torch.from_numpy(index[a:a + step]), hist_i, hist_r)
               for a in range(0, len(index), step)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def _score_items(self, data: CTRData, u: int, items: torch.Tensor, hist_i: list[int],
                     hist_r: list[int]) -> np.ndarray:
        n = len(items)
        hist = torch.tensor(hist_i).repeat(n, 1)
        batch = {
            "user": torch.full((n,), u), "item": items, "label": torch.zeros(n),
            "user_feats": data.user_feats[torch.full((n,), u)], "item_feats": data.item_feats[items],
            "item_tags": data.item_tags[items], "hist_items": hist, "hist_feats": data.item_feats[hist],
            "hist_tags": data.item_tags[hist], "hist_ratings": torch.tensor(hist_r).repeat(n, 1),
            "hist_mask": hist > 0,
        }
        return self.score_batch(batch)


def read_item_ids(path: str | Path) -> list[str]:
    """Item ids from a file: one id a line (blank lines skipped), or a Parquet file with one column.

    Order and duplicates are kept (see :func:`dedupe`); a bad file is a one-line DataError naming it.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found" if not p.exists() else f"{p}: not a file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"PAR1" or p.suffix.lower() in (".parquet", ".pq"):
        try:
            import pandas as pd
            df = pd.read_parquet(p)
        except ImportError as e:
            raise DataError(f"{p}: reading Parquet needs pandas and pyarrow ({e}); or give one id a line") from None
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
            raise DataError(f"{p}: not a readable Parquet file ({one_line(e, 200)})") from None
        if df.shape[1] != 1:
            cols = ", ".join(map(str, df.columns))
            raise DataError(f"{p}: expected one column of item ids, found {df.shape[1]} ({cols})")
        col = df.iloc[:, 0]
        bad = np.flatnonzero(col.isna().to_numpy())
        if len(bad):
            raise DataError(f"{p}, row {int(bad[0]) + 1}, column {str(df.columns[0])!r}: empty item id")
        if col.dtype.kind == "f" and np.all(np.mod(col.to_numpy(), 1) == 0):
            col = col.astype(np.int64)
        ids = [str(v).strip() for v in col.tolist()]
    else:
        ids = []
        with open(p, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise DataError(f"{p}, line {n}: not UTF-8 text (one item id a line, or a Parquet file)") from None
                if line:
                    ids.append(line)
    if not ids:
        raise DataError(f"{p}: no item ids in the file")
    return ids


def dedupe(ids: Sequence[str]) -> list[str]:
    """``ids`` without repeats, in the order of first occurrence."""
    return list(dict.fromkeys(str(i) for i in ids))


def _latest_history(data: CTRData, u: int, T: int) -> tuple[list[int], list[int]]:
    for name in ("train", "val", "test"):
        s = data.split(name)
        rows = np.flatnonzero(s.user == u)
        if len(rows):
            j = rows[np.argmax(s.position[rows])]
            items = list(s.hist_items[j][1:]) + [int(s.item[j])]
            # the rating of the last item is unknown to the split arrays' history; use its label
            ratings = list(s.hist_ratings[j][1:]) + [5 if s.label[j] > 0 else 1]
            return items[-T:], ratings[-T:]
    a, b = data.llm_offsets[u], data.llm_offsets[u + 1]
    items = [0] * T + data.llm_items[a:b].tolist()
    ratings = [0] * T + data.llm_ratings[a:b].tolist()
    return items[-T:], ratings[-T:]


_DAMAGED = "the checkpoint is damaged: retrain the run (cocorec train ... --overwrite) or restore the file"


def _read_checkpoint_config(path: Path) -> dict[str, Any]:
    """checkpoint/config.json, checked field by field: a one-line DataError naming the file and the field."""
    try:
        cfg = read_json(path)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {_DAMAGED}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"{path}: unreadable ({e}); {_DAMAGED}") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(cfg).__name__}; {_DAMAGED}")
    fmt = cfg.get("format", "cocorec-checkpoint-v1")
    if fmt != "cocorec-checkpoint-v1":
        raise DataError(f"{path}: field 'format' is {fmt!r}, expected 'cocorec-checkpoint-v1'")
    types = {"backbone": str, "method": str, "spec": dict, "dataset": str, "model": dict, "method_args": dict,
             "knowledge_dims": list, "protocol": dict}
    for name, kind in types.items():
        if name not in cfg and name in ("model", "method_args", "knowledge_dims", "protocol"):
            continue
        if name not in cfg:
            raise DataError(f"{path}: missing field {name!r}; {_DAMAGED}")
        if not isinstance(cfg[name], kind):
            raise DataError(f"{path}: field {name!r} should be a {kind.__name__}, found {cfg[name]!r:.80}; {_DAMAGED}")
    from cocorec.knowledge.base import METHODS, import_methods
    from cocorec.models import MODELS

    if cfg["backbone"] not in MODELS:
        names = ", ".join(sorted(MODELS))
        raise DataError(f"{path}: field 'backbone' is {cfg['backbone']!r}, not a backbone ({names})")
    import_methods()
    if cfg["method"] not in METHODS:
        raise DataError(f"{path}: field 'method' is {cfg['method']!r}, not a method ({', '.join(sorted(METHODS))})")
    return cfg


def _run_seed(cfg: dict[str, Any], run_dir: Path) -> int:
    """The run's seed: from the checkpoint config, else (checkpoints written before it was recorded
    there) from the run's metrics.json, else 0."""
    if isinstance(cfg.get("seed"), int):
        return int(cfg["seed"])
    try:
        seed = read_json(run_dir / "metrics.json").get("config", {}).get("seed", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return int(seed) if isinstance(seed, int) else 0


def find_dataset(cfg: dict[str, Any], run_dir: Path) -> str:
    """The dataset a run was trained on, from any working directory: a built-in name as is; a directory at
    its recorded absolute path (``dataset_path``), else as given (relative to the working directory, as old
    runs were), else relative to a folder above the run directory. The data key check confirms the pick."""
    from cocorec.data.raw import BUILTIN

    name = cfg["dataset"]
    if name in BUILTIN:
        return name
    tried: list[str] = []
    candidates = [cfg.get("dataset_path"), name]
    if not Path(name).is_absolute():
        candidates += [str(parent / name) for parent in run_dir.resolve().parents]
    for c in candidates:
        if c and c not in tried:
            tried.append(c)
            if Path(c).is_dir():
                return c
    raise DataError(f"the run's dataset {name!r} was not found (looked in: {', '.join(tried[:4])}"
                    + (", ..." if len(tried) > 4 else "") + "); pass --dataset DIR")


def run_data(run_dir: str | Path, cfg: dict[str, Any] | None = None, data_dir: str | None = None,
             dataset: str | None = None) -> CTRData:
    """The processed data a run was trained on (its protocol, its dataset found from any working
    directory), checked against the checkpoint's data key. ``cfg``: the checkpoint config, if read."""
    where = Path(run_dir) / "checkpoint" / "config.json"
    if cfg is None:
        if not where.is_file():
            raise DataError(f"no trained checkpoint in {where.parent} (expected config.json)")
        cfg = _read_checkpoint_config(where)
    proto = dict(cfg.get("protocol", {}))
    if "split_ratios" in proto:
        proto["split_ratios"] = tuple(proto["split_ratios"])
    try:
        protocol = ProtocolConfig(**proto)
    except TypeError as e:
        raise DataError(f"{where}: field 'protocol': {one_line(e, 240)}; {_DAMAGED}") from None
    if data_dir is None and cfg.get("data_dir") and Path(cfg["data_dir"]).is_dir():
        data_dir = cfg["data_dir"]
    name = dataset or find_dataset(cfg, Path(run_dir))
    data = prepare(name, protocol, data_dir=data_dir)
    if cfg.get("data_key") and data.key != cfg["data_key"]:
        raise DataError(f"the data found for {cfg['dataset']!r} ({name}) differs from the data the model was "
                        f"trained on (key {data.key} != {cfg['data_key']})")
    return data


def load_scorer(run_dir: str | Path, data: CTRData | None = None, data_dir: str | None = None,
                load_data: bool = True, dataset: str | None = None, device: str | None = None) -> Scorer:
    """Rebuild backbone and method from a run directory's checkpoint and load the weights.

    The data is the run's own (found from any working directory, see :func:`find_dataset`) unless
    ``data`` or ``dataset`` is given; ``data_dir`` defaults to the one the run was trained with.
    ``device``: put the backbone there before the method is built on it (CoCo's LM and modules follow
    it): for computing the method's knowledge on a GPU (``cocorec knowledge refresh --device``); the
    scorer's ``score_*`` build their batches on the CPU and expect the default.
    """
    ck = Path(run_dir) / "checkpoint"
    if not (ck / "config.json").is_file() or not (ck / "model.safetensors").is_file():
        raise DataError(f"no trained checkpoint in {ck} (expected config.json and model.safetensors)")
    cfg = _read_checkpoint_config(ck / "config.json")
    where = ck / "config.json"
    try:
        spec = FeatureSpec(**cfg["spec"])
    except TypeError as e:
        raise DataError(f"{where}: field 'spec': {one_line(e, 240)}; {_DAMAGED}") from None
    try:
        # the run's seed draws its source (corrupted users, derangements): CoCo re-reads the texts from it
        method = build_method(cfg["method"], seed=_run_seed(cfg, Path(run_dir)), **cfg.get("method_args", {}))
        method.bind(spec)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: field 'method_args': {one_line(e, 240)}; {_DAMAGED}") from None
    try:
        model = build_model(cfg["backbone"], spec, knowledge_dims=cfg.get("knowledge_dims", []), **cfg.get("model", {}))
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise DataError(f"{where}: fields 'model'/'spec'/'knowledge_dims': {one_line(e, 240)}; {_DAMAGED}") from None
    tensors = load_safetensors(ck / "model.safetensors", hint=_DAMAGED)
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"{where} does not match {ck / 'model.safetensors'} ({one_line(e, 240)}); was config.json "
                        f"edited? restore it or retrain the run") from None
    if device:
        model.to(device)
    if data is None and load_data:
        data = run_data(run_dir, cfg, data_dir=data_dir, dataset=dataset)
    state = {k[7:]: v for k, v in tensors.items() if k.startswith("method/")}
    try:   # attach (CoCo loads its LM and builds its modules), restore, prepare for the data
        method.build(model, data, state=state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"{where} does not match {ck / 'model.safetensors'} ({one_line(e, 240)}); was config.json "
                        f"edited? restore it or retrain the run") from None
    return Scorer(model, method, cfg, data)
