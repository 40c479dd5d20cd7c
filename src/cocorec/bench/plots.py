"""PNG plots of a results file (matplotlib, Agg backend; no display needed).

* ``auc_by_method.png``: test AUC per backbone and method (mean, error bar = std over seeds), one panel
  per dataset;
* ``group_delta_<dataset>.png``: heatmap of per-group test AUC minus base (kar, coco and the other
  knowledge methods) for each backbone;
* ``contradiction_rate.png``: every list-valued diagnostics entry whose key contains "contradiction"
  (e.g. CoCo's contradiction rate over training), one line per run;
* ``codebook_usage.png``: counts per codebook entry (a diagnostics list or mapping whose key contains
  "code"; the key with "count" or "usage" in it preferred), one panel per run.

A plot whose data is missing is skipped (not an error). :func:`make_plots` returns {title: path}.

Example:
    >>> import tempfile
    >>> make_plots([], tempfile.mkdtemp())
    {}
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from cocorec.bench.results import aggregate, latest_runs

MAX_PANELS = 12


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    from cocorec.utils.io import atomic_write_bytes
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    _plt().close(fig)
    return path


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("_") or "x"


# ----------------------------------------------------------------------------- series discovery
def _walk(d: Any, path: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    if isinstance(d, Mapping):
        for k, v in d.items():
            yield path + (str(k),), v
            yield from _walk(v, path + (str(k),))


def _numbers(v: Any) -> list[float] | None:
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return [float(x) for x in v]
    return None


def _series(v: Any) -> tuple[list[float], list[float], str] | None:
    """(x, y, x label) of a list of numbers, or of a list of dicts with a rate-like value and a step/epoch."""
    nums = _numbers(v)
    if nums is not None:
        return list(range(1, len(nums) + 1)), nums, "logged point"
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, Mapping) for x in v):
        xs, ys, xlabel = [], [], "logged point"
        for i, e in enumerate(v, 1):
            numeric = {k: float(val) for k, val in e.items()
                       if isinstance(val, (int, float)) and not isinstance(val, bool)}
            ykey = next((k for k in numeric if "rate" in k or "contradiction" in k), None)
            ykey = ykey or next((k for k in numeric if k not in ("step", "epoch", "batch", "n")), None)
            if ykey is None:
                continue
            xkey = next((k for k in ("step", "epoch", "batch") if k in numeric), None)
            if xkey:
                xlabel = xkey
            xs.append(numeric[xkey] if xkey else float(i))
            ys.append(numeric[ykey])
        return (xs, ys, xlabel) if ys else None
    return None


def contradiction_series(diagnostics: Any) -> dict[str, tuple[list[float], list[float], str]]:
    """Dotted key -> (x, y, x label) for list-valued diagnostics whose key mentions 'contradiction'."""
    out = {}
    for path, v in _walk(diagnostics):
        if "contradiction" in ".".join(path).lower():
            s = _series(v)
            if s is not None and len(s[1]) >= 1:
                out[".".join(path)] = s
    return out


def codebook_counts(diagnostics: Any) -> tuple[str, list[float]] | None:
    """(dotted key, counts per code) from a diagnostics list/mapping whose key mentions 'code'."""
    found: list[tuple[int, str, list[float]]] = []
    for path, v in _walk(diagnostics):
        name = ".".join(path).lower()
        if "code" not in name or "contradiction" in name:
            continue
        counts = _numbers(v)
        if counts is None and isinstance(v, Mapping) and v and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values()):
            keys = list(v)
            try:
                keys.sort(key=lambda k: int(k))
            except (TypeError, ValueError):
                pass
            counts = [float(v[k]) for k in keys]
        if counts is None or any(c < 0 for c in counts):
            continue
        score = 2 if ("count" in name or "usage" in name) else 1
        found.append((score, ".".join(path), counts))
    if not found:
        return None
    found.sort(key=lambda t: -t[0])
    return found[0][1], found[0][2]


# ----------------------------------------------------------------------------- plots
def plot_auc(agg: Mapping[str, Any], path: Path) -> Path | None:
    datasets = [d for d, a in agg.items() if any(a["cells"].get(b) for b in a["backbones"])]
    if not datasets:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(datasets), 1, figsize=(max(6, 1.6 * max(len(agg[d]["backbones"]) for d in datasets)
                                                            * max(1, len(agg[datasets[0]]["methods"]) / 3)),
                                                        3.6 * len(datasets)), squeeze=False)
    for ax, d in zip(axes[:, 0], datasets):
        a = agg[d]
        bbs, ms = a["backbones"], a["methods"]
        width = 0.8 / max(1, len(ms))
        x = np.arange(len(bbs))
        lo, hi = 1.0, 0.0
        for j, m in enumerate(ms):
            means, errs = [], []
            for b in bbs:
                c = a["cells"].get(b, {}).get(m)
                mean = c["auc"]["mean"] if c else None
                means.append(np.nan if mean is None else mean)
                errs.append((c["auc"]["std"] or 0.0) if c and mean is not None else 0.0)
            vals = [v for v in means if not math.isnan(v)]
            if vals:
                lo, hi = min(lo, min(vals)), max(hi, max(vals))
            ax.bar(x + (j - (len(ms) - 1) / 2) * width, means, width, yerr=errs, capsize=2, label=m)
        ax.set_xticks(x, bbs)
        ax.set_ylabel("test AUC")
        ax.set_title(f"{d}: test AUC (mean ± std over seeds)")
        if hi > lo:
            pad = max(0.005, (hi - lo) * 0.3)
            ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))
        ax.legend(fontsize=8, ncol=min(len(ms), 4))
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_group_delta(dataset: str, a: Mapping[str, Any], path: Path) -> Path | None:
    panels = []
    for b in a["backbones"]:
        row = a["cells"].get(b, {})
        methods = [m for m in a["methods"] if m != "base" and row.get(m) and row[m]["group_delta"]]
        methods.sort(key=lambda m: (m not in ("kar", "coco"), m != "kar"))
        if methods:
            groups = sorted({g for m in methods for g in row[m]["group_delta"]})
            panels.append((b, methods, groups, row))
    if not panels:
        return None
    plt = _plt()
    panels = panels[:MAX_PANELS]
    n_groups = max(len(p[2]) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 1.3 * sum(len(p[1]) for p in panels),
                                                     1.2 + 0.35 * n_groups), squeeze=False)
    vmax = max(abs(v) for p in panels for m in p[1] for v in p[3][m]["group_delta"].values()) or 0.01
    im = None
    for ax, (b, methods, groups, row) in zip(axes[0], panels):
        mat = np.array([[row[m]["group_delta"].get(g, np.nan) for m in methods] for g in groups])
        im = ax.imshow(mat, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(methods)), [f"{m}−base" for m in methods], rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(groups)), groups if ax is axes[0][0] else [""] * len(groups), fontsize=8)
        ax.set_title(b, fontsize=9)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if not math.isnan(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:+.3f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(mat[i, j]) > 0.6 * vmax else "black")
    fig.suptitle(f"{dataset}: per-group test AUC minus base ({a.get('grouping')})", fontsize=10, y=1.1)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="Δ AUC")
    return _save(fig, path)


def plot_contradiction(runs: list[Mapping[str, Any]], path: Path) -> Path | None:
    lines = []
    for r in runs:
        for key, (xs, ys, xlabel) in contradiction_series(r.get("diagnostics")).items():
            lines.append((f"{r.get('dataset')} {r.get('backbone')} {r.get('method')} s{r.get('seed')}"
                          + (f" [{key}]" if key.lower() not in ("contradiction_rate",) else ""), xs, ys, xlabel))
    if not lines:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, xs, ys, _ in lines[:20]:
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    ax.set_xlabel(lines[0][3])
    ax.set_ylabel("contradiction rate")
    ax.set_title("Contradiction rate over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_codebook(runs: list[Mapping[str, Any]], path: Path) -> Path | None:
    panels = []
    for r in runs:
        cc = codebook_counts(r.get("diagnostics"))
        if cc is not None:
            panels.append((f"{r.get('dataset')} {r.get('backbone')} {r.get('method')} s{r.get('seed')}", *cc))
    if not panels:
        return None
    panels = panels[:MAX_PANELS]
    plt = _plt()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, key, counts) in zip(axes.flat, panels):
        c = np.asarray(counts, dtype=float)
        ax.bar(np.arange(len(c)), c, color="tab:blue")
        p = c / c.sum() if c.sum() > 0 else c
        nz = p[p > 0]
        perplexity = float(np.exp(-(nz * np.log(nz)).sum())) if nz.size else 0.0
        ax.set_title(f"{title}\n{key}: {int((c > 0).sum())}/{len(c)} used, perplexity {perplexity:.1f}", fontsize=8)
        ax.set_xlabel("code")
        ax.set_ylabel("count")
    fig.suptitle("Codebook usage", fontsize=10, y=1.03)
    return _save(fig, path)


def make_plots(records: Iterable[Mapping[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Write every plot that has data to ``out_dir``; return {title: path}. Never raises on missing data."""
    runs, _ = latest_runs(records)
    out_dir = Path(out_dir)
    done: dict[str, Path] = {}
    if not runs:
        return done
    agg = aggregate(runs)
    p = plot_auc(agg, out_dir / "auc_by_method.png")
    if p:
        done["Test AUC by backbone and method"] = p
    for d, a in agg.items():
        p = plot_group_delta(d, a, out_dir / f"group_delta_{_slug(d)}.png")
        if p:
            done[f"Per-group AUC vs base: {d}"] = p
    p = plot_contradiction(runs, out_dir / "contradiction_rate.png")
    if p:
        done["Contradiction rate over training"] = p
    p = plot_codebook(runs, out_dir / "codebook_usage.png")
    if p:
        done["Codebook usage"] = p
    return done
