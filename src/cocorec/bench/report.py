"""Aggregate a results JSONL (one line per run) into a Markdown report.

Per dataset:

* compact test-AUC and test-GAUC matrices (backbone x method, mean ± std over runs);
* the full table: test AUC, LogLoss, GAUC (mean ± sample std, ddof=1), runs present (and the machine
  of each when runs come from several), RelaImpr over ``base`` of the same backbone (by mean AUC), the
  paired differences to ``kar`` and to ``base`` with paired t-tests (``scipy.stats.ttest_rel``;
  "n/a" with fewer than 2 pairs), test AUC with the knowledge zeroed and permuted across users, and
  cost (wall time, train time, peak memory, LM tokens when a method reports ``lm_tokens``);
* the controls (when the results hold a ``field`` method or a non-LM knowledge source): every
  knowledge variant against base, what permuting its knowledge across users costs, the share of the
  same source's direct-field gain it recovers, and the between-user share of its knowledge vector;
* the per-group tables (``gender x age_group`` when present; ``corrupt`` for runs with corrupted
  users): base, kar and coco test AUC per group, and for every knowledge method the groups whose AUC
  drops below base;
* scalar method diagnostics (codebook perplexity, contradiction rate, ...).

A *method* here is a run's method label (``kar``, ``kar[source=oracle]``: the ``variant`` of its
results line). Runs are *paired* across methods by (split seed, seed): a grid with 3 user splits and 3
seeds gives 9 pairs per comparison. Missing runs show as "—" (and "missing" in the runs column);
failures recorded by ``cocorec bench`` (``failures.jsonl`` next to the results) are listed. When a run
key appears more than once the latest line wins; so does the latest line of a (dataset, backbone,
method, split, seed) run under different configs.

Example (the aggregate behind it: :mod:`cocorec.bench.results`):
    >>> recs = [{"dataset": "d", "backbone": "din", "method": "base", "seed": 0, "run_key": "b0", "split_seed": 42,
    ...          "metrics": {"test": {"auc": 0.7, "logloss": 0.5, "gauc": 0.7}}}]
    >>> render_report(recs).splitlines()[0]
    '# cocorec benchmark report'
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from cocorec.bench.results import (BACKBONE_ORDER, GROUP_METHODS, METHOD_ORDER, RUN_GROUPINGS, _cell_id, _ordered,
                                   ablation_reference, aggregate, latest_runs, load_results, machine_label,
                                   method_of, split_of)

DASH = "—"


def _f(x: Any, digits: int = 4, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _ms(st: Mapping[str, Any] | None, digits: int = 4) -> str:
    if not st or st.get("mean") is None:
        return DASH
    s = _f(st["mean"], digits)
    return s + (f" ± {st['std']:.{digits}f}" if st.get("std") is not None else "")


def _p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _paired(t: Mapping[str, Any] | None, ref: bool = False) -> str:
    """A seed-paired difference as ``+0.0012 (p=0.340, 3 pairs)``; ``(ref)`` for the reference itself."""
    if ref:
        return "(ref)"
    if t is None:
        return DASH
    if t["mean_diff"] is None:
        return "n/a"
    n = t["n_pairs"]
    return _f(t["mean_diff"], 4, signed=True) + f" ({_p(t['p'])}, {n} pair{'s' if n != 1 else ''})"


def _num(x: Any) -> str:
    if x is None:
        return DASH
    x = float(x)
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}"


def _int(x: Any) -> str:
    return DASH if x is None else f"{float(x):.0f}"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or ("l" * 2 + "r" * (len(header) - 2))
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return lines


def _expected_from_grid(grid: Any) -> dict[str, dict[str, Any]]:
    exp: dict[str, dict[str, Any]] = {}
    for d in grid.datasets:
        exp[d] = {"backbones": [b.lower() for b in grid.backbones], "methods": list(grid.methods),
                  "seeds": list(grid.seeds), "splits": list(grid.split_seeds or [])}
    return exp


def _machines_cell(machines: Mapping[str, int]) -> str:
    if not machines:
        return DASH
    if len(machines) == 1:
        return next(iter(machines))
    return ", ".join(f"{k} ×{v}" for k, v in sorted(machines.items()))


def render_report(records: Iterable[Mapping[str, Any]], *, results_path: str | None = None,
                  failures: Iterable[Mapping[str, Any]] = (), grid: Any = None,
                  plots: Mapping[str, str] | None = None, hurt_margin: float = 0.001) -> str:
    """The Markdown report of ``records`` (results lines). ``plots``: title -> relative PNG path."""
    records = list(records)
    runs, superseded = latest_runs(records)
    agg = aggregate(runs, hurt_margin=hurt_margin)
    expected = _expected_from_grid(grid) if grid is not None else {}
    for d in expected:  # datasets of the grid with no results at all still get a table
        agg.setdefault(d, {"backbones": [], "methods": [], "seeds": [], "splits": [], "grouping": None, "cells": {},
                           "lm_tokens": False})
    lines = _header(records, runs, superseded, results_path)
    if not agg:
        lines += ["No results yet.", ""]
    for dataset, a in agg.items():
        lines += _dataset_sections(dataset, a, expected.get(dataset, {}), hurt_margin)
    lines += _failures_section(runs, failures)
    if plots:
        lines += ["## Plots", ""]
        for title, rel in plots.items():
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _header(records: list[Mapping[str, Any]], runs: list[dict[str, Any]], superseded: int,
            results_path: str | None) -> list[str]:
    lines = ["# cocorec benchmark report", ""]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines.append(f"Generated {now} from `{results_path or 'results'}`: {len(records)} result lines, "
                 f"{len(runs)} runs used" + (f" ({superseded} older lines superseded by a later line of the same "
                                              f"run)" if superseded else "") + ".")
    days = sorted({str(r["time"])[:10] for r in runs if r.get("time")})
    if days:
        when = f"on {days[0]}" if len(days) == 1 else f"between {days[0]} and {days[-1]}"
        lines.append(f"Runs finished {when} (UTC).")
    shas = sorted({str(r.get("git_sha")) for r in runs if r.get("git_sha")})
    if shas:
        lines.append(f"Code version(s): {', '.join(f'`{s}`' for s in shas)}.")
    machines = sorted({machine_label(r["machine"]) for r in runs if r.get("machine")})
    if machines:
        lines.append(f"Machine(s): {'; '.join(machines)}.")
    return lines + ["", "Test metrics are mean ± sample std (ddof=1) over runs. Runs of different methods are "
                    "paired by (user split seed, seed). RelaImpr = ((AUC − 0.5) / (AUC_base − 0.5) − 1) × 100 by "
                    "mean test AUC against `base` on the same backbone. \"Δ AUC vs kar\" is the mean paired "
                    "test-AUC difference to `kar` with a two-sided paired t-test (scipy `ttest_rel`; n/a with "
                    "< 2 pairs); \"Δ AUC vs base\" the same against `base`. \"AUC k=0\" is the same trained "
                    "model with its knowledge fields zeroed, \"AUC k perm.\" with every test user reading "
                    "another test user's knowledge. A method `NAME[source=oracle]` reads a deliberate leak "
                    "(the user's own label rates): a control, never a result. "
                    f"\"{DASH}\" marks a missing run. Model selection used validation only.", ""]


def _dataset_sections(dataset: str, a: Mapping[str, Any], e: Mapping[str, Any], hurt_margin: float) -> list[str]:
    backbones = _ordered(set(a["backbones"]) | set(e.get("backbones", [])), BACKBONE_ORDER)
    methods = _ordered(set(a["methods"]) | set(e.get("methods", [])), METHOD_ORDER)
    seeds = sorted(set(a["seeds"]) | set(e.get("seeds", [])))
    splits = sorted(set(a.get("splits", [])) | set(e.get("splits", [])))
    n_exp = len(seeds) * max(1, len(splits))
    cells = a["cells"]
    what = f"Seeds: {', '.join(map(str, seeds)) or DASH}."
    if len(splits) > 1:
        what = (f"User splits (split seeds): {', '.join(map(str, splits))}; seeds: {', '.join(map(str, seeds))}: "
                f"{n_exp} runs per cell, paired across methods by (split, seed).")
    lines = [f"## {dataset}", "", what, ""]
    for title, k in (("Test AUC", "auc"), ("Test GAUC", "gauc")):
        # GAUC ranks items within each user: knowledge can move it differently from the pooled AUC
        rows = [[b] + [_ms(cells.get(b, {}).get(m, {}).get(k)) for m in methods] for b in backbones]
        lines += [f"### {title} (backbone × method)", ""] + _table(["backbone"] + methods, rows,
                                                                   "l" + "r" * len(methods)) + [""]
    lines += _full_table(a, backbones, methods, n_exp)
    lines += _controls_section(backbones, methods, cells)
    lines += _ablation_section(backbones, methods, cells)
    if a.get("grouping"):
        lines += _group_section(dataset, a["grouping"], backbones, methods, cells, hurt_margin)
    lines += _run_group_section(backbones, methods, cells)
    lines += _diagnostics_section(backbones, methods, cells)
    return lines


def _full_table(a: Mapping[str, Any], backbones: list[str], methods: list[str], n_exp: int) -> list[str]:
    cells = a["cells"]
    header = ["backbone", "method", "runs", "test AUC", "LogLoss", "GAUC", "RelaImpr %", "Δ AUC vs kar",
              "Δ AUC vs base", "AUC k=0", "AUC k perm.", "wall s", "train s", "peak MB"]
    # runs from several machines: say which ran each cell (numerics and costs differ between machines)
    mixed = len({k for row in cells.values() for c in row.values() for k in c["machines"]}) > 1
    if mixed:
        header.insert(3, "machine")
    if a.get("lm_tokens"):
        header.append("LM tokens")
    rows = []
    n_missing = 0
    for b in backbones:
        for m in methods:
            c = cells.get(b, {}).get(m)
            if c is None:
                n_missing += n_exp
                rows.append([b, m, "missing"] + [DASH] * (len(header) - 3))
                continue
            n_missing += max(0, n_exp - c["n"])
            row = [b, m, f"{c['n']}" + (f"/{n_exp}" if c["n"] < n_exp else ""), _ms(c["auc"]), _ms(c["logloss"]),
                   _ms(c["gauc"]), _f(c["rela_impr"], 2, signed=True) if c["rela_impr"] is not None else DASH,
                   _paired(c.get("vs_kar"), ref=m == "kar"), _paired(c.get("vs_base"), ref=m == "base"),
                   _ms(c["auc_no_knowledge"]) if m != "base" else DASH,
                   _ms(c["auc_knowledge_permuted"]) if m != "base" else DASH,
                   _num(c["wall_seconds"]), _num(c["train_seconds"]), _num(c["peak_memory_mb"])]
            if a.get("lm_tokens"):
                row.append(_num(c["lm_tokens"]))
            if mixed:
                row.insert(3, _machines_cell(c["machines"]))
            rows.append(row)
    lines = ["### All metrics", ""] + _table(header, rows, "llr" + ("l" if mixed else "")
                                             + "r" * (len(header) - (4 if mixed else 3))) + [""]
    if mixed:
        lines += ["These runs come from more than one machine (the machine column; runs per machine). "
                  "Floating-point results and costs differ between machines: compare a method with the base "
                  "that ran on the same machine where you can.", ""]
    if n_missing:
        lines += [f"{n_missing} run(s) of this dataset are missing (see Failures below, or run the grid again).", ""]
    return lines


def _controls_section(backbones: list[str], methods: list[str], cells: Mapping[str, Any]) -> list[str]:
    """Every knowledge method against base, with what its knowledge carries about the user."""
    def is_control(c: Mapping[str, Any], m: str) -> bool:
        return m.startswith("field") or c["source"] != "lm" or c["corrupt"] > 0
    if not any(is_control(c, m) for row in cells.values() for m, c in row.items()):
        return []
    header = ["backbone", "method", "source", "runs", "test AUC", "Δ vs base (paired)", "Δ permuted (paired)",
              "Δ k=0 (paired)", "of the field's gain", "between-user share"]
    rows = []
    for b in backbones:
        row = cells.get(b, {})
        for m in methods:
            c = row.get(m)
            if c is None or m == "base":
                continue
            ceiling = row.get(f"field[source={c['source']}]") if not m.startswith("field") else None
            share = DASH
            if ceiling and c.get("vs_base") and ceiling.get("vs_base"):
                gain, top = c["vs_base"]["mean_diff"], ceiling["vs_base"]["mean_diff"]
                if gain is not None and top:
                    share = f"{100 * gain / top:.0f}%"
            how = "corrupt" if c.get("corruption", "invert") == "invert" else c["corruption"]
            src = c["source"] + (f" +{how} {c['corrupt']:g}" if c["corrupt"] else "")
            rows.append([b, m + (" (leak)" if c["source"] == "oracle" else ""), src, str(c["n"]), _ms(c["auc"]),
                         _paired(c.get("vs_base")), _paired(c.get("knowledge_permuted_vs_own")),
                         _paired(c.get("no_knowledge_vs_own")), share, _f(c.get("between_user_share"), 3)])
    return (["### Controls: what the knowledge carries about the user", "",
             "Each knowledge method against `base` on the same backbone (paired by split and seed). "
             "\"Δ permuted\": the same trained model with every test user reading another test user's "
             "knowledge, minus its own score (paired run by run): a signal about the user costs AUC when "
             "permuted. \"Δ k=0\": the same with the knowledge zeroed. \"of the field's gain\": the method's "
             "gain over base as a share of the gain of `field` with the same source (the source's ceiling "
             "as a plain per-user vector). \"between-user share\": the share of the knowledge vector's "
             "mean squared norm that varies between users (the rest is a constant and, for item fields, "
             "within-user variance). `oracle` is a leak (the user's own label rates, test labels "
             "included): it shows what the pipeline can detect, never a result.", ""]
            + _table(header, rows, "lll" + "r" * (len(header) - 3)) + [""])


def _ablation_section(backbones: list[str], methods: list[str], cells: Mapping[str, Any]) -> list[str]:
    """Each CoCo ablation (``coco-*``) against ``coco`` with the same settings on the same backbone,
    paired by (split, seed)."""
    ablations = [m for m in methods if m.startswith("coco-")]
    rows = [[b] + [_paired(cells.get(b, {}).get(m, {}).get("vs_coco")) for m in ablations]
            for b in backbones if any(cells.get(b, {}).get(m, {}).get("vs_coco") for m in ablations)]
    if not ablations or not rows:
        return []
    header = [f"{m} vs {ablation_reference(m)}" for m in ablations]
    return (["### CoCo ablations: Δ test AUC against the full CoCo", "",
             "Mean test-AUC difference of each ablation to `coco` with the same settings (source, corruption) "
             "on the same backbone, paired by (split, seed), with a two-sided paired t-test: a positive value "
             "means the part the ablation removes did not help.", ""]
            + _table(["backbone"] + header, rows, "l" + "r" * len(ablations)) + [""])


def _diagnostics_section(backbones: list[str], methods: list[str], cells: Mapping[str, Any]) -> list[str]:
    rows = []
    for b in backbones:
        for m in methods:
            c = cells.get(b, {}).get(m)
            if c and c["diagnostics"]:
                items = list(c["diagnostics"].items())
                shown = ", ".join(f"{k}={_fmt_diag(v)}" for k, v in items[:14])
                if len(items) > 14:
                    shown += f", … ({len(items) - 14} more)"
                rows.append([b, m, shown])
    if not rows:
        return []
    return ["### Method diagnostics (mean over runs)", ""] + _table(["backbone", "method", "diagnostics"], rows,
                                                                    "lll") + [""]


def _failures_section(runs: list[dict[str, Any]], failures: Iterable[Mapping[str, Any]]) -> list[str]:
    """Failures that no later success replaced."""
    done = {r.get("run_key") for r in runs}
    done_cells = {_cell_id(r) for r in runs}
    open_fail: dict[tuple, Mapping[str, Any]] = {}
    for f in failures:
        if f.get("run_key") in done or _cell_id(f) in done_cells:
            continue
        open_fail[_cell_id(f)] = f
    if not open_fail:
        return []
    rows = [[str(f.get("dataset")), str(f.get("backbone")), method_of(f),
             DASH if split_of(f) is None else str(split_of(f)), str(f.get("seed")), str(f.get("time", "")),
             str(f.get("error", "")).splitlines()[0][:200] if f.get("error") else ""]
            for f in open_fail.values()]
    return (["## Failures and unavailable runs", ""]
            + _table(["dataset", "backbone", "method", "split", "seed", "time", "error"], rows, "lllllll") + [""])


def _run_group_section(backbones: list[str], methods: list[str], cells: Mapping[str, Any]) -> list[str]:
    """Groups a run defines itself (``corrupt``): each group's AUC, and with the knowledge zeroed."""
    lines: list[str] = []
    for grouping in RUN_GROUPINGS:
        rows = []
        for b in backbones:
            for m in methods:
                c = cells.get(b, {}).get(m)
                rg = (c or {}).get("run_groups", {}).get(grouping)
                if not rg:
                    continue
                for g in sorted(rg["with"]):
                    w, wo = rg["with"][g].get("auc"), rg["without"].get(g, {}).get("auc")
                    rows.append([b, m, g, _int(rg["with"][g].get("users")), _int(rg["with"][g].get("n")), _f(w),
                                 _f(wo), _f(w - wo, 4, signed=True) if w is not None and wo is not None else DASH])
        if rows:
            lines += [f"### Per-group test AUC ({grouping})", "",
                      "Groups the run defines itself (the users whose knowledge it corrupted, and the rest): "
                      "test AUC with the knowledge and with it zeroed (the same trained model), mean over runs.",
                      ""] + _table(["backbone", "method", "group", "users", "n", "AUC", "AUC k=0", "Δ"], rows,
                                   "lll" + "r" * 5) + [""]
    return lines


def _fmt_diag(v: Any) -> str:
    if v is None:
        return DASH
    if abs(v) >= 1000 or float(v).is_integer():
        return f"{v:.0f}"
    return f"{v:.4g}"


def _group_section(dataset: str, grouping: str, backbones: list[str], methods: list[str],
                   cells: Mapping[str, Mapping[str, Any]], hurt_margin: float) -> list[str]:
    lines = [f"### Per-group test AUC ({grouping})", "",
         f"Mean test AUC per user group; Δ against `base` on the same backbone. A method *hurts* a group when "
         f"the group's AUC is more than {hurt_margin:g} below base's. Groups with too few samples have no AUC.", ""]
    shown = [m for m in GROUP_METHODS if m in methods]
    knowledge = [m for m in methods if m != "base"]
    any_table = False
    for b in backbones:
        row_cells = cells.get(b, {})
        if not row_cells:
            continue
        groups = list(dict.fromkeys(g for c in row_cells.values() for g in c["groups"]))
        if not groups:
            continue
        any_table = True
        groups.sort()
        header = ["group", "n", "users"] + [m if m == "base" else f"{m} (Δ)" for m in shown]
        rows = []
        base = row_cells.get("base")
        for g in groups:
            ref = next((c["groups"][g] for c in row_cells.values() if g in c["groups"]), {})
            row = [g, _int(ref.get("n")), _int(ref.get("users"))]
            for m in shown:
                c = row_cells.get(m)
                if c is None:
                    row.append("missing")
                    continue
                au = c["groups"].get(g, {}).get("auc")
                s = _f(au)
                if m != "base" and base is not None and g in c["group_delta"]:
                    s += f" ({c['group_delta'][g]:+.4f})"
                row.append(s)
            rows.append(row)
        lines += [f"**{b}**", ""] + _table(header, rows, "l" + "r" * (len(header) - 1)) + [""]
        hurt_lines = []
        for m in knowledge:
            c = row_cells.get(m)
            if c is None:
                hurt_lines.append(f"- {m}: missing")
            elif base is None:
                hurt_lines.append(f"- {m}: n/a (base missing)")
            elif not c["group_delta"]:
                hurt_lines.append(f"- {m}: n/a (no group AUCs)")
            elif c["hurts"]:
                hurt_lines.append(f"- {m} hurts {len(c['hurts'])}/{len(c['group_delta'])} groups: " + ", ".join(
                    f"{g} ({c['group_delta'][g]:+.4f})" for g in c["hurts"]))
            else:
                hurt_lines.append(f"- {m} hurts no group ({len(c['group_delta'])} compared)")
        if hurt_lines:
            lines += hurt_lines + [""]
    if not any_table:
        lines += ["No per-group metrics in these results.", ""]
    return lines


def write_report(results: str | os.PathLike, output: str | os.PathLike | None = None,
                 plots_dir: str | os.PathLike | None = None, grid: Any = None, make_plots: bool = True,
                 hurt_margin: float = 0.001) -> tuple[Path, list[Path]]:
    """Render ``results`` to ``output`` (default: REPORT.md next to it) and PNG plots into ``plots_dir``.

    Returns (report path, plot paths). A missing results file gives a report that says so.
    """
    from cocorec.bench.grid import failures_path, read_jsonl
    from cocorec.utils.io import atomic_write_text

    results = Path(results)
    output = Path(output) if output else results.with_name("REPORT.md")
    records = load_results(results)
    failures = read_jsonl(failures_path(results))
    written: list[Path] = []
    plot_links: dict[str, str] = {}
    if make_plots:
        from cocorec.bench.plots import make_plots as _make

        pdir = Path(plots_dir) if plots_dir else output.parent / "plots"
        runs, _ = latest_runs(records)
        for title, path in _make(runs, pdir).items():
            written.append(path)
            plot_links[title] = os.path.relpath(Path(path).resolve(), output.parent.resolve()).replace(os.sep, "/")
    text = render_report(records, results_path=str(results), failures=failures, grid=grid, plots=plot_links,
                         hurt_margin=hurt_margin)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, text)
    return output, written
