"""Bench grids (expansion, skip/resume, failures), report aggregation and rendering, plots, end to end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from cocorec.bench.grid import (GridError, expand_grid, failures_path, load_grid, plan_status, read_jsonl,
                                run_grid)
from cocorec.bench.report import render_report, write_report
from cocorec.bench.results import aggregate, latest_runs, paired_ttest
from cocorec.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- grid expansion
def test_grid_expansion_order_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "g.yaml"
    f.write_text(yaml.safe_dump({
        "datasets": ["ml-100k"], "backbones": ["din", "deepfm"], "methods": ["base"], "seeds": "0-1",
        "overrides": {"train.epochs": 3, "train": {"lr": 0.01}},
        "backbone_overrides": {"deepfm": {"train.epochs": 5}},
    }))
    g = load_grid(f)
    assert g.name == "g" and g.seeds == [0, 1]
    plans = expand_grid(g, out_dir=str(tmp_path / "runs"))
    assert [p.label for p in plans] == ["ml-100k din base s0", "ml-100k deepfm base s0",
                                        "ml-100k din base s1", "ml-100k deepfm base s1"]
    din0, deepfm0 = plans[0].config, plans[1].config
    assert din0.train.epochs == 3 and din0.train.lr == 0.01
    assert deepfm0.train.epochs == 5 and deepfm0.train.lr == 0.01      # per-backbone beats global
    assert din0.results == str(tmp_path / "runs" / "results.jsonl")
    assert len({p.key for p in plans}) == 4
    for p in plans:
        assert p.config.key() == p.key and p.config.output == p.output
        assert Path(p.output).parent == tmp_path / "runs" / "ml-100k" and p.key[:8] in p.output
    # the key is the run's identity: same config -> same key, changed override -> new key and directory
    again = expand_grid(load_grid(f), out_dir=str(tmp_path / "runs"))
    assert [p.key for p in again] == [p.key for p in plans]
    g.overrides["train"]["lr"] = "0.02"
    assert expand_grid(g, out_dir=str(tmp_path / "runs"))[0].key != plans[0].key


def test_grid_method_overrides_and_errors(tmp_path: Path) -> None:
    from cocorec.knowledge.base import METHODS, KnowledgeMethod

    class Toy(KnowledgeMethod):
        def __init__(self, width: int = 4) -> None:
            super().__init__()
            self.width = width

    METHODS["toy-a"] = Toy
    try:
        g = load_grid({"methods": ["base", "toy-a", "nosuch"], "seeds": [0],
                       "method_overrides": {"toy-*,other": {"method.width": 9}}})
        plans = expand_grid(g, out_dir=str(tmp_path))
        by = {p.method: p for p in plans}
        assert by["toy-a"].config.method_args == {"width": 9}
        assert by["base"].config.method_args == {}
        assert by["nosuch"].config is None and by["nosuch"].status == "unavailable"
        assert "not available" in by["nosuch"].error
        with pytest.raises(ConfigError, match="widthh"):      # a typo in an available method's key
            expand_grid(load_grid({"methods": ["toy-a"], "method_overrides": {"toy-a": {"method.widthh": 1}}}))
    finally:
        METHODS.pop("toy-a", None)
    with pytest.raises(GridError, match="unknown grid key"):
        load_grid({"dataset": ["ml-100k"]})
    with pytest.raises(GridError, match="method_overrides"):
        load_grid({"overrides": {"method.codebook_size": 8}})
    with pytest.raises(GridError, match="unknown section"):
        load_grid({"overrides": {"optim.lr": 1}})
    with pytest.raises(GridError, match="unknown backbone"):
        expand_grid(load_grid({"backbones": ["nosuchnet"]}))
    with pytest.raises(ConfigError, match="epochz"):
        expand_grid(load_grid({"overrides": {"train.epochz": 1}}))
    with pytest.raises(ConfigError):
        expand_grid(load_grid({"overrides": {"train.epochs": "many"}}))
    with pytest.raises(GridError, match="not found"):
        load_grid(tmp_path / "missing.yaml")


def test_shipped_grids_load() -> None:
    from cocorec.bench.demo import QUICK_GRID, demo_grid

    from cocorec.bench.grid import available_methods

    grids = {n: load_grid(REPO / "grids" / f"{n}.yaml")
             for n in ("quick", "full", "ci", "ml100k-din-dcnv2", "ml100k-kar-fields", "controls",
                       "coco-controls")}
    assert len(expand_grid(grids["ml100k-din-dcnv2"], out_dir="x")) == 126
    full = grids["full"]
    assert full.datasets == ["ml-100k", "ml-1m-3k"] and full.seeds == [0, 1, 2] and len(full.backbones) == 6
    # every method but the control (field) and the one-prompt ablation (coco-oneprompt: the old static)
    assert set(full.methods) == available_methods()[0] - {"field", "coco-oneprompt"}
    controls = expand_grid(grids["controls"], out_dir="z")
    assert len(controls) == 7 * 2 * 9 and {p.split_seed for p in controls} == {42, 43, 44}
    assert {p.method for p in controls} >= {"field[source=oracle]", "kar[source=shuffled]", "kar"}
    cc = {p.method for p in expand_grid(grids["coco-controls"], out_dir="c")}
    assert {"coco[corrupt=0.3,source=oracle]", "coco-nojudge[corrupt=0.3,source=oracle]", "static"} <= cc
    # the kar-fields grid shares its base and kar runs with the full grid (same run keys)
    fk = {(p.backbone, p.method, p.seed): p.key for p in expand_grid(full, out_dir="x") if p.dataset == "ml-100k"}
    for p in expand_grid(grids["ml100k-kar-fields"], out_dir="y"):
        assert fk[(p.backbone, p.method, p.seed)] == p.key
    ci = grids["ci"]
    assert ci.methods == ["base"] and ci.overrides["train"]["epochs"] == "1"
    quick = grids["quick"]
    q = load_grid(QUICK_GRID)
    assert (quick.datasets, quick.backbones, quick.methods, quick.seeds, quick.overrides, quick.method_overrides) == (
        q.datasets, q.backbones, q.methods, q.seeds, q.overrides, q.method_overrides)  # demo == grids/quick.yaml
    assert demo_grid().methods == ["base", "kar", "coco"]
    # the demo's LM dtypes are the CPU's fastest: never an explicit bf16 that a CPU without AVX512-BF16 emulates
    demo_runs = expand_grid(demo_grid(), out_dir="d")
    assert [p.config.method_args.get("lm_dtype", "auto") for p in demo_runs] == ["auto"] * 3
    for g in grids.values():
        assert len(expand_grid(g)) == (len(g.datasets) * len(g.backbones) * len(g.methods) * len(g.seeds)
                                       * len(g.split_seeds or [0]))


# ----------------------------------------------------------------------------- skip, resume, failures
def _fake_runner(calls: list, fail: set[str] = frozenset()):
    """Writes metrics.json + a results line like cocorec.train.run.run, without training."""
    from cocorec.train.run import append_result
    from cocorec.utils.io import atomic_write_json

    def runner(cfg, data=None):
        calls.append(cfg.key())
        if cfg.backbone in fail:
            raise RuntimeError(f"boom in {cfg.backbone}")
        m = {"test": {"auc": 0.7, "logloss": 0.6, "gauc": 0.69}, "config": {"run_key": cfg.key()}}
        atomic_write_json(Path(cfg.output) / "metrics.json", m)
        append_result(cfg.results, {"dataset": cfg.dataset, "backbone": cfg.backbone, "method": cfg.method,
                                    "seed": cfg.seed, "run_key": cfg.key(), "output": cfg.output,
                                    "metrics": {"test": m["test"]}})
        return m
    return runner


def test_skip_resume_and_failures(tmp_path: Path) -> None:
    g = load_grid({"backbones": ["din", "deepfm", "dcnv2"], "methods": ["base"], "seeds": [0],
                   "overrides": {"train.epochs": 1}})
    results = tmp_path / "res.jsonl"
    kw = dict(out_dir=str(tmp_path / "runs"), results=str(results), quiet=True, log=lambda s: None,
              data_fn=lambda cfg: None)
    calls: list = []
    s = run_grid(g, runner=_fake_runner(calls, fail={"deepfm"}), **kw)
    assert len(calls) == 3                                              # a failure does not stop the grid
    assert [p.status for p in s.runs] == ["done", "failed", "done"] and not s.ok
    fails = read_jsonl(failures_path(results))
    assert len(fails) == 1 and fails[0]["backbone"] == "deepfm" and "boom in deepfm" in fails[0]["error"]
    assert "RuntimeError" in fails[0]["traceback"]
    # rerun: the two finished runs are skipped, only the failed one runs again
    calls.clear()
    s = run_grid(g, runner=_fake_runner(calls), **kw)
    assert [p.status for p in s.runs] == ["cached", "done", "cached"] and s.ok
    assert calls == [s.runs[1].key]
    # a results line without metrics.json is not a finished run (and vice versa)
    din = s.runs[0]
    (Path(din.output) / "metrics.json").unlink()
    plans = plan_status(expand_grid(g, out_dir=kw["out_dir"], results=str(results)), results)
    assert [p.status for p in plans] == ["todo", "cached", "cached"]
    lines = [ln for ln in results.read_text().splitlines() if json.loads(ln)["backbone"] != "deepfm"]
    results.write_text("\n".join(lines) + "\n{torn line\n")
    plans = plan_status(expand_grid(g, out_dir=kw["out_dir"], results=str(results)), results)
    assert [p.status for p in plans] == ["todo", "todo", "cached"]
    # dry run: lists, runs nothing
    calls.clear()
    out: list[str] = []
    s = run_grid(g, runner=_fake_runner(calls), dry_run=True, **{**kw, "log": out.append})
    assert calls == [] and "todo" in out[0] and "cached" in out[0] and "2 todo" in out[-1]


def test_shards_split_a_grid_and_share_one_results_file(tmp_path: Path) -> None:
    from cocorec.bench.cli import parse_shard

    g = load_grid({"backbones": ["din", "deepfm", "dcnv2"], "methods": ["base"], "seeds": [0, 1],
                   "overrides": {"train.epochs": 1}})
    results = tmp_path / "res.jsonl"
    kw = dict(out_dir=str(tmp_path / "runs"), results=str(results), quiet=True, log=lambda s: None,
              data_fn=lambda cfg: None)
    ran: list[list] = []
    for i in range(3):
        calls: list = []
        s = run_grid(g, runner=_fake_runner(calls), shard=(i, 3), **kw)
        assert len(s.runs) == 2 and all(p.status == "done" for p in s.runs)
        ran.append(calls)
    all_keys = [p.key for p in expand_grid(g, out_dir=kw["out_dir"], results=str(results))]
    assert sorted(k for c in ran for k in c) == sorted(all_keys)         # each run exactly once
    assert ran[1] == all_keys[1::3]
    # afterwards the whole grid is cached
    assert all(p.status == "cached" for p in plan_status(expand_grid(g, out_dir=kw["out_dir"]), results))
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) is None
    for bad in ("4/4", "x", "1/0", "-1/3"):
        with pytest.raises(GridError, match="shard"):
            parse_shard(bad)
    with pytest.raises(GridError, match="shard"):
        run_grid(g, runner=_fake_runner([]), shard=(3, 3), **kw)


def test_interrupt_stops_and_unavailable_is_recorded(tmp_path: Path) -> None:
    g = load_grid({"methods": ["nosuch", "base"], "seeds": [0, 1]})
    results = tmp_path / "res.jsonl"
    calls: list = []

    def runner(cfg, data=None):
        calls.append(cfg.key())
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_grid(g, out_dir=str(tmp_path), results=str(results), quiet=True, log=lambda s: None,
                 data_fn=lambda cfg: None, runner=runner)
    assert len(calls) == 1
    fails = read_jsonl(failures_path(results))
    assert [f["method"] for f in fails] == ["nosuch"] and "not available" in fails[0]["error"]


# ----------------------------------------------------------------------------- aggregation
GROUPS = {"base": (0.70, 0.72), "kar": (0.69, 0.75), "coco": (0.71, 0.73)}
DIN_AUC = {"base": [0.70, 0.72, 0.74], "kar": [0.73, 0.74, 0.78], "coco": [0.76, 0.75, 0.77]}


def rec(backbone: str, method: str, seed: int, auc: float, key: str | None = None, **extra) -> dict:
    g = GROUPS.get(method, (0.7, 0.7))
    r = {"time": "2025-01-01T00:00:00+00:00", "git_sha": "abc", "dataset": "ml-100k", "backbone": backbone,
         "method": method, "seed": seed, "run_key": key or f"{backbone}-{method}-{seed}", "output": None,
         "metrics": {"val": {"auc": auc - 0.01}, "test": {"auc": auc, "logloss": 1 - auc, "gauc": auc - 0.01, "n": 100},
                     "test_no_knowledge": None if method == "base" else {"auc": auc - 0.02}},
         "groups": {"test": {"gender": {"female": {"n": 40, "users": 4, "auc": g[0]}},
                             "gender x age_group": {"female / <25": {"n": 40, "users": 4, "auc": g[0]},
                                                    "male / <25": {"n": 60, "users": 6, "auc": g[1]},
                                                    "male / 45+": {"n": 5, "users": 1}}}},
         "diagnostics": {}, "cost": {"wall_seconds": 10.0 * (seed + 1), "train_seconds": 5.0 * (seed + 1),
                                     "samples_per_s": 100.0, "peak_memory_mb": 500.0 + seed}}
    r.update(extra)
    return r


def handmade() -> list[dict]:
    rows = [rec("din", "base", 0, 0.60),                                   # superseded by the same key below
            rec("din", "coco", 1, 0.50, key="old-coco-config")]            # superseded: same cell, later line
    for m, aucs in DIN_AUC.items():
        for s, a in enumerate(aucs):
            extra = {}
            if m == "coco":
                extra["diagnostics"] = {"codebook": {"usage_counts": [5, 0, 3, 2], "perplexity": 2.7},
                                        "contradiction_rate": [0.3, 0.2, 0.1 + 0.01 * s], "lm_tokens": 1000 * (s + 1)}
            rows.append(rec("din", m, s, a, **extra))
    rows += [rec("deepfm", "base", 0, 0.71), rec("deepfm", "base", 1, 0.73), rec("deepfm", "kar", 0, 0.72)]
    return rows


def test_aggregate_exact_numbers() -> None:
    runs, dropped = latest_runs(handmade())
    assert dropped == 2 and len(runs) == 12
    a = aggregate(handmade())["ml-100k"]
    assert a["backbones"] == ["din", "deepfm"] and a["methods"] == ["base", "kar", "coco"] and a["seeds"] == [0, 1, 2]
    din = a["cells"]["din"]
    assert din["base"]["auc"]["mean"] == pytest.approx(0.72, abs=1e-12)       # 0.60 line replaced
    assert din["base"]["auc"]["std"] == pytest.approx(0.02, abs=1e-12)
    assert din["kar"]["auc"]["mean"] == pytest.approx(0.75, abs=1e-12)
    assert din["kar"]["auc"]["std"] == pytest.approx(math.sqrt(7e-4), abs=1e-12)
    assert din["coco"]["auc"]["mean"] == pytest.approx(0.76, abs=1e-12)       # 0.50 line replaced
    assert din["coco"]["logloss"]["mean"] == pytest.approx(0.24, abs=1e-12)
    assert din["coco"]["gauc"]["mean"] == pytest.approx(0.75, abs=1e-12)
    assert din["base"]["rela_impr"] == pytest.approx(0.0, abs=1e-9)
    assert din["kar"]["rela_impr"] == pytest.approx((0.25 / 0.22 - 1) * 100, abs=1e-9)   # 13.6364 %
    assert din["coco"]["rela_impr"] == pytest.approx((0.26 / 0.22 - 1) * 100, abs=1e-9)  # 18.1818 %
    ref = stats.ttest_rel(DIN_AUC["coco"], DIN_AUC["kar"])
    assert din["coco"]["vs_kar"]["n_pairs"] == 3
    assert din["coco"]["vs_kar"]["mean_diff"] == pytest.approx(0.01, abs=1e-12)
    assert din["coco"]["vs_kar"]["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert din["kar"]["vs_kar"] is None
    assert din["coco"]["wall_seconds"] == pytest.approx(20.0) and din["coco"]["peak_memory_mb"] == 502.0
    assert din["coco"]["lm_tokens"] == pytest.approx(2000.0) and a["lm_tokens"]
    assert din["coco"]["auc_no_knowledge"]["mean"] == pytest.approx(0.74, abs=1e-12)
    assert din["coco"]["diagnostics"]["codebook.perplexity"] == pytest.approx(2.7)
    # groups: kar loses 0.01 on female / <25 -> hurts; coco gains everywhere; tiny groups have no AUC
    assert a["grouping"] == "gender x age_group"
    assert din["kar"]["hurts"] == ["female / <25"]
    assert din["kar"]["group_delta"]["female / <25"] == pytest.approx(-0.01, abs=1e-12)
    assert din["coco"]["hurts"] == [] and "male / 45+" not in din["coco"]["group_delta"]
    deepfm = a["cells"]["deepfm"]
    assert deepfm["base"]["auc"]["mean"] == pytest.approx(0.72) and deepfm["base"]["n"] == 2
    assert deepfm["kar"]["auc"]["std"] is None                                 # one seed: no std
    assert "coco" not in deepfm


def test_paired_ttest_matches_scipy() -> None:
    a = {0: 0.781, 1: 0.776, 2: 0.790, 3: 0.784, 4: 0.779}
    b = {0: 0.775, 1: 0.777, 2: 0.781, 3: 0.780, 4: 0.770, 9: 0.5}          # seed 9 has no partner
    r = paired_ttest(a, b)
    ref = stats.ttest_rel([a[s] for s in range(5)], [b[s] for s in range(5)])
    assert r["n_pairs"] == 5
    assert r["t"] == pytest.approx(float(ref.statistic), rel=1e-12)
    assert r["p"] == pytest.approx(float(ref.pvalue), rel=1e-12)
    assert r["mean_diff"] == pytest.approx(np.mean([a[s] - b[s] for s in range(5)]), abs=1e-15)
    one = paired_ttest({0: 0.7, 1: 0.8}, {1: 0.75})
    assert one["n_pairs"] == 1 and one["p"] is None and one["mean_diff"] == pytest.approx(0.05)
    assert paired_ttest({}, {0: 0.7}) == {"n_pairs": 0, "mean_diff": None, "t": None, "p": None}
    same = paired_ttest({0: 0.7, 1: 0.8}, {0: 0.7, 1: 0.8})                   # undefined test -> None
    assert same["p"] is None and same["mean_diff"] == 0.0


# ----------------------------------------------------------------------------- rendering
def test_report_renders_with_missing_runs(tmp_path: Path) -> None:
    g = load_grid({"datasets": ["ml-100k", "ml-1m-3k"], "backbones": ["din", "deepfm"],
                   "methods": ["base", "kar", "coco"], "seeds": [0, 1, 2]})
    failures = [{"dataset": "ml-100k", "backbone": "deepfm", "method": "coco", "seed": 0, "run_key": "x",
                 "error": "LMError: model file missing\nmore", "time": "t"},
                {"dataset": "ml-100k", "backbone": "din", "method": "base", "seed": 0, "run_key": "y",
                 "error": "fixed since"}]                                     # a later success replaces it
    text = render_report(handmade(), results_path="r.jsonl", failures=failures, grid=g)
    assert "## ml-100k" in text and "## ml-1m-3k" in text                     # no results at all: still a table
    assert "| deepfm | coco | missing | — |" in text
    assert "### Test GAUC (backbone × method)" in text and "| din | 0.7100 ± 0.0200 |" in text
    assert "| din | coco | 3 | 0.7600 ± 0.0100 | 0.2400 ± 0.0100 | 0.7500 ± 0.0100 | +18.18 |" in text
    assert "| deepfm | base | 2/3 |" in text
    assert "+0.0100 (p=" in text and "3 pairs" in text and "(ref)" in text
    assert "| +0.0100 (p=0.478, 3 pairs) | +0.0400 (p=0.057, 3 pairs) | 0.7400 ± 0.0100 |" in text  # vs kar, vs base
    assert "| +0.00 | -0.0300 (p=0.035, 3 pairs) | (ref) | — |" in text                       # the base row
    assert "2 older lines superseded" in text
    assert "kar hurts 1/2 groups: female / <25 (-0.0100)" in text
    assert "coco hurts no group" in text and "- coco: missing" in text
    assert "LM tokens" in text and "codebook.perplexity=2.7" in text
    assert "LMError: model file missing" in text and "fixed since" not in text
    assert "run(s) of this dataset are missing" in text
    # empty and odd inputs never crash
    assert "No results yet" in render_report([])
    odd = [{"dataset": "x", "method": "base", "backbone": "din", "seed": 0}]  # no metrics at all
    assert "| din | base | 1 | — |" in render_report(odd)
    gpu = {"device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3", "cpu_count": 16, "torch_threads": 2,
           "torch": "2.11.0"}
    text = render_report([{**odd[0], "machine": gpu}, {**odd[0], "seed": 1, "machine": {**gpu, "device": "cpu",
                                                                                       "device_name": None}}])
    assert "Machine(s): NVIDIA H100 80GB HBM3, 16 CPUs, 2 torch threads, torch 2.11.0; cpu, 16 CPUs" in text


def test_plots_written(tmp_path: Path) -> None:
    from cocorec.bench.plots import codebook_counts, contradiction_series, make_plots

    out = make_plots(handmade(), tmp_path / "plots")
    names = sorted(p.name for p in out.values())
    assert names == ["auc_by_method.png", "codebook_usage.png", "contradiction_rate.png", "group_delta_ml-100k.png"]
    for p in out.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    # without diagnostics those plots are skipped, not errors
    plain = [r for r in handmade() if r["method"] == "base"]
    assert sorted(p.name for p in make_plots(plain, tmp_path / "p2").values()) == ["auc_by_method.png"]
    assert make_plots([], tmp_path / "p3") == {}
    assert codebook_counts({"codes": {"1": 3, "0": 1}}) == ("codes", [1.0, 3.0])
    hist = [{"step": 10, "rate": 0.4}, {"step": 20, "rate": 0.2}]
    s = contradiction_series({"judge": {"contradiction_history": hist}})
    assert s == {"judge.contradiction_history": ([10.0, 20.0], [0.4, 0.2], "step")}


def test_write_report_and_cli_errors(tmp_path: Path, capsys) -> None:
    from cocorec.cli import main

    res = tmp_path / "results.jsonl"
    res.write_text("".join(json.dumps(r) + "\n" for r in handmade()))
    report, plots = write_report(res, make_plots=False)
    assert report == tmp_path / "REPORT.md" and plots == [] and "## ml-100k" in report.read_text()
    assert main(["report", "--results", str(tmp_path / "nope.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [ml-100k]\nmethodz: [base]\n")
    assert main(["bench", "--grid", str(bad), "--dry-run"]) == 2


# ----------------------------------------------------------------------------- end to end (real data)
@pytest.mark.slow
def test_bench_end_to_end_ml100k(ml100k, tmp_path: Path, capsys) -> None:
    from cocorec.cli import main

    grid = tmp_path / "ci.yaml"
    grid.write_text(yaml.safe_dump({"name": "ci-test", "datasets": ["ml-100k"], "backbones": ["din"],
                                    "methods": ["base"], "seeds": [0],
                                    "overrides": {"train.epochs": 1, "train.max_steps_per_epoch": 3,
                                                  "train.threads": 1}}))
    res, out = tmp_path / "res.jsonl", tmp_path / "runs"
    t0 = time.perf_counter()
    rc = main(["bench", "--grid", str(grid), "--results", str(res), "--out-dir", str(out), "--quiet"])
    assert rc == 0
    lines = read_jsonl(res)
    assert len(lines) == 1 and lines[0]["method"] == "base" and 0.0 < lines[0]["metrics"]["test"]["auc"] < 1.0
    assert (Path(lines[0]["output"]) / "metrics.json").is_file()
    assert (tmp_path / "REPORT.md").is_file() and (tmp_path / "plots" / "auc_by_method.png").is_file()
    # rerun: cached, nothing trains, no new line
    assert main(["bench", "--grid", str(grid), "--results", str(res), "--out-dir", str(out), "--quiet"]) == 0
    assert len(read_jsonl(res)) == 1 and "1 cached" in capsys.readouterr().out
    assert main(["report", "--results", str(res), "--output", str(tmp_path / "R.md"),
                 "--plots-dir", str(tmp_path / "pl")]) == 0
    text = (tmp_path / "R.md").read_text()
    assert "| din | base | 1 |" in text and "female / <25" in text
    assert (tmp_path / "pl" / "auc_by_method.png").is_file()
    assert time.perf_counter() - t0 < 60


@pytest.mark.slow
def test_run_demo_reports_a_missing_method_and_goes_on(ml100k, tmp_path: Path, monkeypatch, capsys) -> None:
    import cocorec.bench.demo as demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "QUICK_GRID", {**demo.QUICK_GRID, "methods": ["nosuch", "base"],
                                             "overrides": {"train.epochs": 1, "train.max_steps_per_epoch": 2,
                                                           "train.threads": 1}})
    rc = demo.run_demo(quiet=True, plots=False)
    out = capsys.readouterr().out
    assert rc == 1                                             # base ran, the missing method is reported
    assert "nosuch   UNAVAILABLE method 'nosuch' is not available" in out
    assert "base     done" in out and "report: runs/demo/quick/REPORT.md" in out
    assert (tmp_path / "runs" / "demo" / "quick" / "REPORT.md").is_file()


def test_subset_grid_runs_part_of_a_grid_into_the_same_results(tmp_path: Path, capsys) -> None:
    from cocorec.bench.grid import subset_grid
    from cocorec.cli import main

    g = load_grid({"backbones": ["din", "deepfm"], "methods": ["base", "kar", "coco"], "seeds": [0, 1],
                   "method_overrides": {"coco": {"method.codebook_size": 8}}})
    results = tmp_path / "res.jsonl"
    kw = dict(out_dir=str(tmp_path / "runs"), results=str(results), quiet=True, log=lambda s: None,
              data_fn=lambda cfg: None)
    cheap = subset_grid(g, methods="base,kar", backbones=["DIN"])
    assert (cheap.backbones, cheap.methods, cheap.seeds, cheap.method_overrides) == (["din"], ["base", "kar"],
                                                                                    [0, 1], {})
    calls: list = []
    run_grid(cheap, runner=_fake_runner(calls), **kw)
    assert len(calls) == 4
    whole = plan_status(expand_grid(g, out_dir=kw["out_dir"], results=str(results)), results)
    done = {(p.backbone, p.method, p.seed) for p in whole if p.status == "cached"}
    assert done == {("din", m, s) for m in ("base", "kar") for s in (0, 1)}          # same keys as the whole grid
    assert set(calls) == {p.key for p in whole if p.status == "cached"}
    for bad, match in ((dict(methods="base,static"), "static not in the grid"), (dict(seeds="3"), "--seeds"),
                       (dict(datasets="ml-1m-3k"), "--datasets")):
        with pytest.raises(GridError, match=match):
            subset_grid(g, **bad)
    # the CLI: --methods with --dry-run lists only that part
    gf = tmp_path / "g.yaml"
    gf.write_text(yaml.safe_dump({"backbones": ["din", "deepfm"], "methods": ["base", "kar"], "seeds": [0, 1]}))
    assert main(["bench", "--grid", str(gf), "--out-dir", str(tmp_path / "o"), "--methods", "kar",
                 "--seeds", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 runs: 2 todo" in out and " base " not in out


def test_report_names_the_machine_of_each_cell_when_runs_are_mixed() -> None:
    gpu = {"device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3", "cpu_count": 16, "torch_threads": 2}
    cpu = {"device": "cpu", "device_name": None, "cpu_count": 2, "torch_threads": 2}
    recs = [{"dataset": "d", "backbone": "din", "method": m, "seed": s, "run_key": f"{m}{s}", "machine": mach,
             "metrics": {"test": {"auc": 0.7, "logloss": 0.5, "gauc": 0.6}}}
            for m, s, mach in [("base", 0, cpu), ("base", 1, cpu), ("coco", 0, gpu), ("coco", 1, cpu)]]
    text = render_report(recs)
    assert "| backbone | method | runs | machine | test AUC |" in text
    assert "| din | base | 2 | cpu | 0.7000 ± 0.0000 |" in text
    assert "| din | coco | 2 | H100 80GB HBM3 ×1, cpu ×1 |" in text
    assert "more than one machine" in text
    one = render_report([r for r in recs if r["machine"] is cpu])                   # one machine: no column
    assert "| machine |" not in one and "more than one machine" not in one


def test_ablations_are_tested_against_coco_on_the_same_backbone() -> None:
    auc = {("din", "coco"): [0.74, 0.75, 0.76], ("din", "coco-novq"): [0.73, 0.75, 0.74],
           ("din", "coco-nojudge"): [0.75, 0.75, 0.77], ("din", "base"): [0.70, 0.71, 0.72],
           ("deepfm", "coco-novq"): [0.72, 0.73, 0.74]}                      # no coco on deepfm: nothing to pair
    recs = [rec(b, m, s, a) for (b, m), aucs in auc.items() for s, a in enumerate(aucs)]
    cells = aggregate(recs)["ml-100k"]["cells"]
    novq = cells["din"]["coco-novq"]["vs_coco"]
    ref = stats.ttest_rel(auc["din", "coco-novq"], auc["din", "coco"])
    assert novq["n_pairs"] == 3 and novq["mean_diff"] == pytest.approx(-0.01, abs=1e-12)
    assert novq["p"] == pytest.approx(float(ref.pvalue), rel=1e-12)
    assert cells["din"]["coco-nojudge"]["vs_coco"]["mean_diff"] == pytest.approx(0.02 / 3, abs=1e-12)
    assert cells["din"]["coco"]["vs_coco"] is None and cells["din"]["base"]["vs_coco"] is None
    assert cells["deepfm"]["coco-novq"]["vs_coco"] is None
    text = render_report(recs)
    assert "### CoCo ablations: Δ test AUC against the full CoCo" in text
    assert "| backbone | coco-novq vs coco | coco-nojudge vs coco |" in text
    assert f"| din | -0.0100 (p={ref.pvalue:.3f}, 3 pairs) |" in text
    assert "| deepfm |" not in text.split("### CoCo ablations")[1].split("###")[0]     # no coco row to compare
    assert "CoCo ablations" not in render_report([r for r in recs if r["method"] in ("base", "coco")])


def test_report_header_names_the_days_the_runs_finished() -> None:
    recs = [rec("din", "base", s, 0.7) for s in range(3)]
    assert "Runs finished on 2025-01-01 (UTC)." in render_report(recs)
    recs[2]["time"] = "2025-01-03T10:00:00+00:00"
    assert "Runs finished between 2025-01-01 and 2025-01-03 (UTC)." in render_report(recs)


def test_dry_run_estimates_the_time_left_from_finished_runs(tmp_path: Path) -> None:
    from cocorec.bench.grid import estimate_todo

    g = load_grid({"backbones": ["din", "deepfm"], "methods": ["base", "kar"], "seeds": [0, 1]})
    results = tmp_path / "res.jsonl"
    lines = [{"dataset": "ml-100k", "backbone": "din", "method": "base", "cost": {"wall_seconds": 10}},
             {"dataset": "ml-100k", "backbone": "deepfm", "method": "base", "cost": {"wall_seconds": 30}},
             {"dataset": "ml-100k", "backbone": "din", "method": "base", "cost": {"wall_seconds": "bad"}}]
    results.write_text("".join(json.dumps(r) + "\n" for r in lines))
    plans = plan_status(expand_grid(g, out_dir=str(tmp_path / "o"), results=str(results)), results)
    secs, n, unknown = estimate_todo(plans, results)
    assert (secs, n, unknown) == (2 * 10 + 2 * 30, 4, ["ml-100k kar"])   # per backbone where it has runs
    out: list[str] = []
    run_grid(g, out_dir=str(tmp_path / "o"), results=str(results), dry_run=True, log=out.append)
    assert "~0.0 h for 4 run(s)" in out[-2] and "nothing to estimate from for: ml-100k kar" in out[-2]
    assert out[-1].startswith("8 runs: 8 todo")


# ----------------------------------------------------------------------------- splits, variants, controls
def test_split_seeds_and_method_entries_expand_into_their_own_runs(tmp_path: Path) -> None:
    g = load_grid({
        "backbones": ["din"], "methods": ["base", "kar[source=oracle]", "field[ source=template ]", "kar"],
        "seeds": [0, 1], "split_seeds": [42, 43], "method_overrides": {"kar": {"method.standardize": True}}})
    assert g.methods == ["base", "kar[source=oracle]", "field[source=template]", "kar"]
    plans = expand_grid(g, out_dir=str(tmp_path / "runs"))
    assert len(plans) == 4 * 2 * 2 and plans[0].label == "ml-100k din base split42 s0"
    by = {(p.method, p.split_seed, p.seed): p for p in plans}
    oracle = by[("kar[source=oracle]", 43, 1)].config
    assert oracle.method == "kar" and oracle.method_args == {"source": "oracle", "standardize": True}
    assert oracle.protocol.split_seed == 43 and "-p43-s1-" in by[("kar[source=oracle]", 43, 1)].output
    assert by[("kar", 42, 0)].config.method_args == {"standardize": True}           # the pattern matches entries
    assert len({p.key for p in plans}) == len(plans)
    with pytest.raises(GridError, match="key=value"):
        load_grid({"methods": ["kar[oracle]"]})
    with pytest.raises(GridError, match="both set the split"):
        load_grid({"split_seeds": [1], "overrides": {"protocol.split_seed": 3}})
    with pytest.raises(GridError, match="unknown source"):                           # checked at expansion
        expand_grid(load_grid({"methods": ["kar[source=gpt]"]}), out_dir=str(tmp_path / "x"))


def _control_rec(method: str, split: int, seed: int, auc: float, perm: float | None = None, source: str = "lm",
                 variant: str | None = None) -> dict:
    r = rec("din", method, seed, auc, key=f"{variant or method}-{split}-{seed}", split_seed=split,
            variant=variant or method)
    r["config"] = {"method_config": {"source": source, "corrupt": 0.0}}
    if perm is not None:
        r["metrics"]["test_knowledge_permuted"] = {"auc": perm}
        r["diagnostics"] = {"knowledge": {"between_user_variance_share": 0.9}}
    return r


def test_report_pairs_by_split_and_seed_and_shows_the_controls() -> None:
    pairs = [(42, 0), (42, 1), (43, 0), (43, 1)]
    base = [0.70, 0.71, 0.69, 0.72]
    field = [b + d for b, d in zip(base, [0.020, 0.022, 0.018, 0.020])]
    kar = [b + d for b, d in zip(base, [0.010, 0.012, 0.009, 0.009])]
    recs = ([_control_rec("base", sp, s, a) for (sp, s), a in zip(pairs, base)]
            + [_control_rec("field", sp, s, a, perm=a - 0.03, source="oracle", variant="field[source=oracle]")
               for (sp, s), a in zip(pairs, field)]
            + [_control_rec("kar", sp, s, a, perm=a - 0.01, source="oracle", variant="kar[source=oracle]")
               for (sp, s), a in zip(pairs, kar)])
    a = aggregate(recs)["ml-100k"]
    assert a["methods"] == ["base", "field[source=oracle]", "kar[source=oracle]"] and a["splits"] == [42, 43]
    c = a["cells"]["din"]["kar[source=oracle]"]
    assert sorted(c["auc_by_pair"]) == pairs and c["vs_base"]["n_pairs"] == 4
    ref = stats.ttest_rel(kar, base)
    assert c["vs_base"]["mean_diff"] == pytest.approx(0.01, abs=1e-12)
    assert c["vs_base"]["p"] == pytest.approx(float(ref.pvalue), rel=1e-9)
    assert c["knowledge_permuted_vs_own"]["mean_diff"] == pytest.approx(-0.01, abs=1e-12)
    text = render_report(recs)
    assert "User splits (split seeds): 42, 43; seeds: 0, 1: 4 runs per cell" in text
    controls = text.split("### Controls")[1].split("\n### ")[0]
    assert "| din | kar[source=oracle] (leak) | oracle | 4 |" in controls
    assert "| 50% | 0.900 |" in controls                                   # 0.010 of field's 0.020
    assert "Controls" not in render_report([r for r in recs if r["variant"] == "base"])


def test_the_controls_table_names_the_kind_of_corruption() -> None:
    recs = [_control_rec("base", 42, s, 0.70 + s / 100) for s in (0, 1)]
    for variant, how in (("field[corrupt=0.3,source=oracle]", None),
                         ("field[corrupt=0.3,corruption=swap,source=oracle]", "swap")):
        for s in (0, 1):
            r = _control_rec("field", 42, s, 0.71 + s / 100, perm=0.69, source="oracle", variant=variant)
            r["config"]["method_config"].update({"corrupt": 0.3, **({"corruption": how} if how else {})})
            recs.append(r)
    controls = render_report(recs).split("### Controls")[1].split("\n### ")[0]
    assert "| din | field[corrupt=0.3,source=oracle] (leak) | oracle +corrupt 0.3 | 2 |" in controls
    assert "| din | field[corrupt=0.3,corruption=swap,source=oracle] (leak) | oracle +swap 0.3 | 2 |" in controls


def test_an_ablation_is_paired_with_the_coco_of_its_own_settings() -> None:
    # coco-novq on the oracle source is compared with coco on the oracle source, never with coco on the LM's
    auc = {"coco": [0.73, 0.74, 0.75], "coco[source=oracle]": [0.76, 0.77, 0.78],
           "coco-novq[source=oracle]": [0.75, 0.77, 0.77]}
    recs = [rec("din", m.split("[")[0], s, a, key=f"{m}-{s}", variant=m) for m, aucs in auc.items()
            for s, a in enumerate(aucs)]
    cells = aggregate(recs)["ml-100k"]["cells"]["din"]
    novq = cells["coco-novq[source=oracle]"]
    assert novq["coco_ref"] == "coco[source=oracle]"
    assert novq["vs_coco"]["mean_diff"] == pytest.approx(-0.02 / 3, abs=1e-12)
    assert "coco-novq[source=oracle] vs coco[source=oracle]" in render_report(recs)
