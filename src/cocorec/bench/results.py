"""A results JSONL (one line per run) as data: loading, the latest line of each run, pairing by
(split seed, seed), paired t-tests and the aggregate per dataset / backbone / method that the report
(:mod:`cocorec.bench.report`) and the plots (:mod:`cocorec.bench.plots`) render.

Example:
    >>> recs = [{"dataset": "d", "backbone": "din", "method": m, "seed": s, "run_key": f"{m}{s}",
    ...          "split_seed": 42, "metrics": {"test": {"auc": a, "logloss": 0.5, "gauc": a}}}
    ...         for m, s, a in [("base", 0, 0.70), ("base", 1, 0.72), ("kar", 0, 0.73), ("kar", 1, 0.75)]]
    >>> cell = aggregate(recs)["d"]["cells"]["din"]["kar"]
    >>> round(cell["auc"]["mean"], 4), round(cell["rela_impr"], 2)
    (0.74, 14.29)
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping

import numpy as np

from cocorec.eval.metrics import rela_impr

BACKBONE_ORDER = ["din", "dien", "dcnv2", "deepfm", "autoint", "xdeepfm"]
METHOD_ORDER = ["base", "field", "static", "kar", "kar-item", "r4ec", "coco", "coco-novq", "coco-nojudge"]
GROUP_METHODS = ["base", "kar", "coco"]
PREFERRED_GROUPING = "gender x age_group"


# ----------------------------------------------------------------------------- loading
def load_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every well-formed JSON object line of a results file (missing file: empty list)."""
    from cocorec.bench.grid import read_jsonl

    return [r for r in read_jsonl(path) if r.get("dataset") and r.get("method")]


def latest_runs(records: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The latest line per run key, then per (dataset, backbone, method, split, seed); and how many were dropped.

    "Latest" is file order (lines are appended). Runs come back in the order of their kept lines.
    """
    records = list(records)
    last_of_key: dict[Any, int] = {}
    for i, r in enumerate(records):
        last_of_key[r.get("run_key") or f"#line{i}"] = i
    last_of_cell: dict[tuple, int] = {}
    for i in sorted(last_of_key.values()):
        last_of_cell[_cell_id(records[i])] = i
    kept = [dict(records[i]) for i in sorted(last_of_cell.values())]
    return kept, len(records) - len(kept)


def method_of(r: Mapping[str, Any]) -> str:
    """The run's method label (``kar[source=oracle]``); lines written before labels: the method name."""
    return str(r.get("variant") or r.get("method"))


def split_of(r: Mapping[str, Any]) -> int | None:
    """The run's user split seed (older lines: from the recorded protocol)."""
    s = r.get("split_seed")
    if s is None:
        s = _get(r, "config", "protocol", "split_seed")
    return None if s is None else int(s)


def pair_of(r: Mapping[str, Any]) -> tuple[int, int]:
    """What pairs runs of different methods: (split seed, seed)."""
    return (split_of(r) if split_of(r) is not None else -1, int(r.get("seed") or 0))


def _cell_id(r: Mapping[str, Any]) -> tuple:
    return (str(r.get("dataset")), str(r.get("backbone")), method_of(r)) + pair_of(r)


def _ordered(names: Iterable[str], order: list[str]) -> list[str]:
    """``order`` first (a variant ``NAME[...]`` right after ``NAME``), the rest sorted."""
    def rank(n: str) -> tuple:
        base = n.split("[", 1)[0]
        return (order.index(base) if base in order else len(order), base, n != base, n)
    return sorted(set(names), key=rank)


# ----------------------------------------------------------------------------- statistics
def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; None with one value) of the finite values."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None, "n": len(v)}


def paired_ttest(a: Mapping[Any, float], b: Mapping[Any, float]) -> dict[str, Any]:
    """Paired t-test of a vs b over the keys (seeds) both have: mean difference a - b, t, two-sided p.

    ``p`` is None with fewer than 2 pairs or when the test is undefined (identical differences).

    Example:
        >>> r = paired_ttest({0: 0.71, 1: 0.74, 2: 0.73}, {0: 0.70, 1: 0.72, 2: 0.73})
        >>> r["n_pairs"], round(r["mean_diff"], 4)
        (3, 0.01)
    """
    seeds = sorted(set(a) & set(b), key=str)
    pairs = [(float(a[s]), float(b[s])) for s in seeds if a[s] is not None and b[s] is not None]
    out: dict[str, Any] = {"n_pairs": len(pairs), "mean_diff": None, "t": None, "p": None}
    if not pairs:
        return out
    x = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    out["mean_diff"] = float(np.mean(x - y))
    if len(pairs) < 2:
        return out
    import warnings

    from scipy import stats

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # near-identical pairs: scipy warns, we report inf/nan
        res = stats.ttest_rel(x, y)
    t, p = float(res.statistic), float(res.pvalue)
    out["t"] = t if math.isfinite(t) else None
    out["p"] = p if math.isfinite(p) else None
    return out


def _get(d: Any, *path: str) -> Any:
    for k in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


def find_key(d: Any, name: str) -> Any:
    """The first value stored under key ``name`` anywhere in nested dicts (depth first)."""
    if isinstance(d, Mapping):
        if name in d:
            return d[name]
        for v in d.values():
            r = find_key(v, name)
            if r is not None:
                return r
    return None


def flatten_scalars(d: Any, prefix: str = "") -> dict[str, float]:
    """Numeric scalars of nested dicts as dotted keys (lists and strings are skipped)."""
    out: dict[str, float] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                out[key] = float(v)
            elif isinstance(v, Mapping):
                out.update(flatten_scalars(v, key))
    return out


RUN_GROUPINGS = ("corrupt",)   # groupings a run defines for itself (its corrupted users), not the data


def choose_grouping(records: Iterable[Mapping[str, Any]]) -> str | None:
    """The data's grouping the group tables use (``gender x age_group`` when present)."""
    names: dict[str, int] = {}
    for r in records:
        for g, groups in (_get(r, "groups", "test") or {}).items():
            if g not in RUN_GROUPINGS:
                names[g] = max(names.get(g, 0), len(groups or {}))
    if not names:
        return None
    if PREFERRED_GROUPING in names:
        return PREFERRED_GROUPING
    return max(names, key=lambda g: (names[g], g))


def aggregate(records: Iterable[Mapping[str, Any]], hurt_margin: float = 0.001) -> dict[str, Any]:
    """Per dataset: backbones, methods, splits, seeds and one cell per (backbone, method) with statistics.

    ``records`` are deduplicated first (:func:`latest_runs`). Paired comparisons pair runs by
    (split seed, seed). A group is *hurt* by a method when its mean test AUC is more than
    ``hurt_margin`` below base's (same backbone).
    """
    runs, _ = latest_runs(records)
    out: dict[str, Any] = {}
    for dataset in list(dict.fromkeys(str(r["dataset"]) for r in runs)):
        rs = [r for r in runs if str(r["dataset"]) == dataset]
        backbones = _ordered({str(r.get("backbone")) for r in rs}, BACKBONE_ORDER)
        methods = _ordered({method_of(r) for r in rs}, METHOD_ORDER)
        grouping = choose_grouping(rs)
        cells: dict[str, dict[str, Any]] = {}
        for b in backbones:
            cells[b] = {}
            for m in methods:
                cr = [r for r in rs if str(r.get("backbone")) == b and method_of(r) == m]
                if cr:
                    cells[b][m] = _cell(cr, grouping)
            for m, c in cells[b].items():
                _compare(m, c, cells[b], hurt_margin)
        out[dataset] = {"backbones": backbones, "methods": methods, "grouping": grouping, "cells": cells,
                        "seeds": sorted({int(r.get("seed") or 0) for r in rs}),
                        "splits": sorted({s for s in (split_of(r) for r in rs) if s is not None}),
                        "lm_tokens": any(c.get("lm_tokens") is not None
                                         for row in cells.values() for c in row.values())}
    return out


def ablation_reference(method: str) -> str | None:
    """The full CoCo an ablation is compared with: the same settings under ``coco``.

    Example:
        >>> [ablation_reference(m) for m in ("coco-novq[source=oracle]", "coco-nojudge", "kar")]
        ['coco[source=oracle]', 'coco', None]
    """
    name, _, settings = method.partition("[")
    if not name.startswith("coco-"):
        return None
    return "coco" + (f"[{settings}" if settings else "")


def _compare(m: str, c: dict[str, Any], row: Mapping[str, dict[str, Any]], hurt_margin: float) -> None:
    """Fill a cell's comparisons with the other cells of its backbone (``row``)."""
    base, kar = row.get("base"), row.get("kar")
    bm = base["auc"]["mean"] if base else None
    c["rela_impr"] = (rela_impr(c["auc"]["mean"], bm)
                      if bm is not None and c["auc"]["mean"] is not None and bm != 0.5 else None)
    c["vs_kar"] = paired_ttest(c["auc_by_pair"], kar["auc_by_pair"]) if kar and m != "kar" else None
    c["vs_base"] = paired_ttest(c["auc_by_pair"], base["auc_by_pair"]) if base and m != "base" else None
    # an ablation (coco-novq, coco-nojudge, ...) is judged against the full method with the same settings
    # (coco-novq[source=oracle] against coco[source=oracle]), not against the baselines
    c["coco_ref"] = ablation_reference(m)
    coco = row.get(c["coco_ref"]) if c["coco_ref"] else None
    c["vs_coco"] = paired_ttest(c["auc_by_pair"], coco["auc_by_pair"]) if coco else None
    c["group_delta"], c["hurts"] = {}, []
    if base and m != "base":
        for g, st in c["groups"].items():
            bg = base["groups"].get(g, {}).get("auc")
            if st.get("auc") is not None and bg is not None:
                d = st["auc"] - bg
                c["group_delta"][g] = d
                if d < -hurt_margin:
                    c["hurts"].append(g)


def _cell(rs: list[Mapping[str, Any]], grouping: str | None) -> dict[str, Any]:
    test = [_get(r, "metrics", "test") or {} for r in rs]
    cell: dict[str, Any] = {
        "seeds": sorted({int(r.get("seed") or 0) for r in rs}),
        "splits": sorted({s for s in (split_of(r) for r in rs) if s is not None}),
        "auc_by_pair": {pair_of(r): t.get("auc") for r, t in zip(rs, test) if t.get("auc") is not None},
        "source": str(_get(rs[0], "config", "method_config", "source") or "lm"),
        "corrupt": float(_get(rs[0], "config", "method_config", "corrupt") or 0.0),
        "corruption": str(_get(rs[0], "config", "method_config", "corruption") or "invert"),
    }
    for k in ("auc", "logloss", "gauc"):
        cell[k] = mean_std(t.get(k) for t in test)
    cell["n"] = len(rs)  # runs present; a run without a test AUC still counts as present
    cell["machines"] = {}
    for r in rs:
        if isinstance(r.get("machine"), Mapping):
            label = machine_short(r["machine"])
            cell["machines"][label] = cell["machines"].get(label, 0) + 1
    cell["val_auc"] = mean_std(_get(r, "metrics", "val", "auc") for r in rs)
    for k in ("no_knowledge", "knowledge_permuted"):
        by_pair = {pair_of(r): _get(r, "metrics", f"test_{k}", "auc") for r in rs}
        by_pair = {p: v for p, v in by_pair.items() if v is not None}
        cell[f"auc_{k}"] = mean_std(by_pair.values())
        # the same trained model, its knowledge zeroed / permuted: paired with itself, run by run
        cell[f"{k}_vs_own"] = paired_ttest(by_pair, cell["auc_by_pair"]) if by_pair else None
    for k in ("wall_seconds", "train_seconds", "samples_per_s"):
        cell[k] = mean_std(_get(r, "cost", k) for r in rs)["mean"]
    mem = [_get(r, "cost", "peak_memory_mb") for r in rs]
    mem = [float(x) for x in mem if isinstance(x, (int, float))]
    cell["peak_memory_mb"] = max(mem) if mem else None
    tok = [find_key(r.get("diagnostics"), "lm_tokens") for r in rs]
    cell["lm_tokens"] = mean_std(t for t in tok if isinstance(t, (int, float)) and not isinstance(t, bool))["mean"]
    diag = [flatten_scalars(r.get("diagnostics") or {}) for r in rs]
    cell["diagnostics"] = {k: mean_std(d.get(k) for d in diag)["mean"]
                           for k in dict.fromkeys(k for d in diag for k in d)}
    cell["between_user_share"] = mean_std(_get(r, "diagnostics", "knowledge", "between_user_variance_share")
                                          for r in rs)["mean"]
    cell["groups"] = _groups(rs, grouping, "test") if grouping else {}
    cell["run_groups"] = {g: {"with": _groups(rs, g, "test"), "without": _groups(rs, g, "test_no_knowledge")}
                          for g in RUN_GROUPINGS if any(_get(r, "groups", "test", g) for r in rs)}
    return cell


def _groups(rs: list[Mapping[str, Any]], grouping: str, which: str) -> dict[str, dict[str, Any]]:
    """Mean metrics per group of ``grouping`` over the runs (``which``: test or test_no_knowledge)."""
    per_run = [(_get(r, "groups", which, grouping) or {}) for r in rs]
    groups: dict[str, dict[str, Any]] = {}
    for g in dict.fromkeys(g for ps in per_run for g in ps):
        entries = [ps[g] for ps in per_run if g in ps]
        groups[g] = {"auc": mean_std(e.get("auc") for e in entries)["mean"],
                     "n": mean_std(e.get("n") for e in entries)["mean"],
                     "users": mean_std(e.get("users") for e in entries)["mean"]}
    return groups


# ----------------------------------------------------------------------------- rendering


def machine_label(m: Mapping[str, Any]) -> str:
    """``{"device": "cuda:0", "device_name": "NVIDIA H100", "cpu_count": 16, ...}`` -> a short label.

    >>> machine_label({"device": "cpu", "cpu_model": "AMD EPYC", "native_bf16": False, "cpu_count": 2,
    ...                "torch_threads": 1, "torch": "2.13.0+cpu"})
    'cpu (AMD EPYC, no native bf16), 2 CPUs, 1 torch threads, torch 2.13.0+cpu'
    """
    return (f"{_device_name(m)}, {m.get('cpu_count', '?')} CPUs, {m.get('torch_threads', '?')} torch threads, "
            f"torch {m.get('torch', '?')}")


def machine_short(m: Mapping[str, Any]) -> str:
    """The device alone: ``"H100 80GB HBM3"`` (GPU name without the vendor), ``"cpu (AMD EPYC, no native
    bf16)"``, or ``"cpu"`` for a line that does not record its CPU model."""
    name = _device_name(m)
    return name[len("NVIDIA "):] if name.startswith("NVIDIA ") else name


def _device_name(m: Mapping[str, Any]) -> str:
    name = str(m.get("device_name") or m.get("device") or "?")
    if "cpu_model" in m:   # machine_info records it for a CPU run only
        name += f" ({m['cpu_model']}, {'native' if m.get('native_bf16') else 'no native'} bf16)"
    return name
