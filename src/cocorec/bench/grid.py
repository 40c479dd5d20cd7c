"""Benchmark grids: datasets x backbones x methods x seeds (+ overrides), resumable and failure-tolerant.

A grid file (YAML)::

    name: quick                       # optional; default: the file's stem
    datasets: [ml-100k]
    backbones: [din]
    methods: [base, kar, coco]        # an entry may carry method settings: kar[source=oracle]
    seeds: [0]
    split_seeds: [42, 43, 44]         # optional: user splits (protocol.split_seed) as a grid axis
    overrides:                        # every run; `section.key: value` or nested `section: {key: value}`
      train.epochs: 2
      train.max_steps_per_epoch: 30
    backbone_overrides:               # optional, per backbone (comma lists and fnmatch patterns allowed)
      dien: {model.gru_hidden: 32}
    method_overrides:                 # optional, per method: the place for `method.*` settings
      "coco*": {method.codebook_size: 8}
    data_dir: null                    # optional: where the datasets live (else found automatically)
    out_dir: runs/bench/quick         # optional: run directories; default runs/bench/<name>
    results: null                     # optional: results JSONL; default <out_dir>/results.jsonl

A method entry ``NAME[key=value,...]`` is the method ``NAME`` with those ``method.*`` settings: its
own cell in reports (``kar[source=oracle]`` beside ``kar``), labelled by the entry. In YAML write such
entries as a block list (``- kar[source=oracle]``) or quote them. Runs are paired across methods by
(split seed, seed): every split x seed is one pair in the report's paired tests.

Precedence: ``overrides`` < ``backbone_overrides`` < ``method_overrides`` < an entry's own settings.
``method_overrides`` patterns match an entry's label or its method name. Every key is checked
(unknown keys and wrong types are errors before anything runs). ``method.*`` keys belong under
``method_overrides`` because each method has its own arguments.

Each run gets ``<out_dir>/<dataset>/<backbone>-<method>[-p<split>]-s<seed>-<key8>/`` (key8: the first 8 hex digits
of its run key, so a changed configuration never resumes into an old directory). A run is *cached*
(skipped) when the results file has a line with its run key **and** a ``metrics.json`` with that run key
exists in its output directory. Everything else runs; an interrupted run resumes from its ``last/``.
A run that raises is recorded in ``failures.jsonl`` next to the results file and the grid goes on.
A method that is not registered (not built, or its module fails to import) is reported as unavailable.

Example:
    >>> g = load_grid({"datasets": "ml-100k", "backbones": ["din", "deepfm"], "methods": ["base"],
    ...                "seeds": [0], "overrides": {"train.epochs": 1}})
    >>> plans = expand_grid(g, out_dir="runs/bench/doc")
    >>> [p.label for p in plans]
    ['ml-100k din base s0', 'ml-100k deepfm base s0']
    >>> plans[0].config.train.epochs
    1
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import gc
import json
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from cocorec.config import ConfigError

GRID_KEYS = {"name", "description", "datasets", "backbones", "methods", "seeds", "split_seeds", "overrides",
             "backbone_overrides", "method_overrides", "data_dir", "out_dir", "results"}
_ENTRY = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(?:\[(.*)\])?\s*$")
SECTIONS = ("train", "protocol", "model", "method")


class GridError(ConfigError):
    """A grid file is malformed (unknown key, wrong type, bad override)."""


Sections = dict[str, dict[str, str]]


@dataclass
class Grid:
    name: str = "bench"
    datasets: list[str] = field(default_factory=lambda: ["ml-100k"])
    backbones: list[str] = field(default_factory=lambda: ["din"])
    methods: list[str] = field(default_factory=lambda: ["base"])
    seeds: list[int] = field(default_factory=lambda: [0])
    split_seeds: list[int] | None = None    # None: the protocol's split seed (not an axis)
    overrides: Sections = field(default_factory=dict)
    backbone_overrides: dict[str, Sections] = field(default_factory=dict)
    method_overrides: dict[str, Sections] = field(default_factory=dict)
    data_dir: str | None = None
    out_dir: str | None = None
    results: str | None = None
    description: str = ""


@dataclass
class PlannedRun:
    """One cell of the grid. ``config`` is None when the run cannot be built (``error`` says why)."""

    dataset: str
    backbone: str
    method: str                 # the grid entry: a method name, or NAME[key=value,...]
    seed: int
    output: str
    key: str
    config: Any = None          # RunConfig
    error: str | None = None    # e.g. "method 'coco' is not available"
    status: str = "todo"        # todo | cached | unavailable (after plan_status) | done | failed (after run)
    split_seed: int | None = None

    @property
    def label(self) -> str:
        split = f" split{self.split_seed}" if self.split_seed is not None else ""
        return f"{self.dataset} {self.backbone} {self.method}{split} s{self.seed}"


# ----------------------------------------------------------------------------- parsing
def _scalar_str(v: Any, where: str) -> str:
    """Values reach RunConfig.with_overrides as strings (as on the command line)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    if isinstance(v, (int, float, str)):
        return str(v)
    raise GridError(f"{where}: unsupported value {v!r}")


def parse_overrides(raw: Any, where: str) -> Sections:
    """``{"train.lr": 0.01}`` or ``{"train": {"lr": 0.01}}`` (or a list of "a.b=c" strings) -> sections."""
    out: Sections = {}
    if raw is None:
        return out
    if isinstance(raw, list):
        items: list[tuple[str, Any]] = []
        for s in raw:
            if not isinstance(s, str) or "=" not in s:
                raise GridError(f"{where}: list entries must look like section.key=value, got {s!r}")
            k, v = s.split("=", 1)
            items.append((k.strip(), v.strip()))
    elif isinstance(raw, Mapping):
        items = []
        for k, v in raw.items():
            k = str(k)
            if "." not in k and isinstance(v, Mapping):
                items += [(f"{k}.{kk}", vv) for kk, vv in v.items()]
            else:
                items.append((k, v))
    else:
        raise GridError(f"{where}: expected a mapping of section.key: value, got {type(raw).__name__}")
    for k, v in items:
        if "." not in k:
            raise GridError(f"{where}: {k!r} must look like section.key (e.g. train.epochs)")
        section, key = k.split(".", 1)
        if section not in SECTIONS:
            raise GridError(f"{where}: unknown section {section!r} in {k!r} (use {', '.join(SECTIONS)})")
        out.setdefault(section, {})[key] = _scalar_str(v, f"{where}.{k}")
    return out


def _str_list(v: Any, where: str) -> list[str]:
    if isinstance(v, str):
        v = [x.strip() for x in v.split(",") if x.strip()]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise GridError(f"{where}: expected a non-empty list of names, got {v!r}")
    return list(dict.fromkeys(x.strip() for x in v))


def _int_list(v: Any, what: str) -> list[int]:
    if isinstance(v, bool):
        raise GridError(f"{what}: expected integers, got {v!r}")
    if isinstance(v, int):
        return [v]
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", v)
        if m:  # "0-2"
            return list(range(int(m.group(1)), int(m.group(2)) + 1))
        v = [x for x in v.split(",") if x.strip()]
    if not isinstance(v, list) or not v:
        raise GridError(f"{what}: expected a list of integers, got {v!r}")
    try:
        return list(dict.fromkeys(int(x) for x in v if not isinstance(x, bool)))
    except (TypeError, ValueError):
        raise GridError(f"{what}: expected a list of integers, got {v!r}") from None


def parse_method_entry(entry: str) -> tuple[str, dict[str, str]]:
    """``"kar[source=oracle, corrupt=0.3]"`` -> ``("kar", {"source": "oracle", "corrupt": "0.3"})``.

    Example:
        >>> parse_method_entry("coco[corrupt=0.3,source=oracle]")
        ('coco', {'corrupt': '0.3', 'source': 'oracle'})
        >>> parse_method_entry("base")
        ('base', {})
    """
    m = _ENTRY.match(entry)
    if not m:
        raise GridError(f"methods: {entry!r} must look like NAME or NAME[key=value,...]")
    settings: dict[str, str] = {}
    for part in (m.group(2) or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise GridError(f"methods: {entry!r}: {part.strip()!r} must look like key=value")
        k, v = part.split("=", 1)
        settings[k.strip()] = v.strip()
    if m.group(2) is not None and not settings:
        raise GridError(f"methods: {entry!r} has empty brackets")
    return m.group(1).lower(), settings


def _canonical_entry(entry: str) -> str:
    """A method entry with a lower-case name, sorted settings and values spelled as in a run's method
    label (:func:`cocorec.knowledge.base.format_setting`): one spelling per cell."""
    from cocorec.knowledge.base import format_setting

    name, settings = parse_method_entry(entry)
    inner = ",".join(f"{k}={format_setting(v)}" for k, v in sorted(settings.items()))
    return f"{name}[{inner}]" if inner else name


def _split_entries(v: Any) -> list[str]:
    """A comma list of method entries, where commas inside brackets belong to the entry."""
    if not isinstance(v, str):
        return _str_list(v, "methods")
    out, depth, cur = [], 0, ""
    for ch in v:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return _str_list([x.strip() for x in out if x.strip()], "methods")


def load_grid(source: str | Path | Mapping[str, Any], name: str | None = None) -> Grid:
    """Read a grid from a YAML file or a mapping; raise GridError on anything malformed."""
    if isinstance(source, Mapping):
        raw: Any = dict(source)
        default_name = name or str(raw.get("name") or "bench")
    else:
        import yaml

        path = Path(source)
        if not path.is_file():
            raise GridError(f"grid file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise GridError(f"grid file {path}: invalid YAML ({e})") from None
        default_name = name or path.stem
    if not isinstance(raw, Mapping):
        raise GridError("a grid must be a mapping (datasets, backbones, methods, seeds, overrides...)")
    unknown = set(raw) - GRID_KEYS
    if unknown:
        raise GridError(f"unknown grid key(s) {sorted(unknown)} (allowed: {', '.join(sorted(GRID_KEYS))})")
    g = Grid(name=str(raw.get("name") or default_name))
    g.description = str(raw.get("description") or "")
    for k in ("datasets", "backbones"):
        if k in raw:
            setattr(g, k, _str_list(raw[k], k))
    if "methods" in raw:
        g.methods = _split_entries(raw["methods"])
    g.backbones = [b.lower() for b in g.backbones]
    g.methods = list(dict.fromkeys(_canonical_entry(m) for m in g.methods))
    if "seeds" in raw:
        g.seeds = _int_list(raw["seeds"], "seeds")
    if raw.get("split_seeds") is not None:
        g.split_seeds = _int_list(raw["split_seeds"], "split_seeds")
    g.overrides = parse_overrides(raw.get("overrides"), "overrides")
    if g.split_seeds is not None and "split_seed" in g.overrides.get("protocol", {}):
        raise GridError("split_seeds and overrides' protocol.split_seed both set the split: keep one")
    if "method" in g.overrides:
        raise GridError("overrides: method.* settings differ per method; put them under method_overrides "
                        "(e.g. method_overrides: {coco: {method.codebook_size: 8}})")
    for k in ("backbone_overrides", "method_overrides"):
        v = raw.get(k) or {}
        if not isinstance(v, Mapping):
            raise GridError(f"{k}: expected a mapping name -> overrides")
        setattr(g, k, {str(pat): parse_overrides(ov, f"{k}.{pat}") for pat, ov in v.items()})
    for k in ("data_dir", "out_dir", "results"):
        if raw.get(k) is not None:
            setattr(g, k, str(raw[k]))
    return g


def subset_grid(grid: Grid, datasets: Any = None, backbones: Any = None, methods: Any = None,
                seeds: Any = None, split_seeds: Any = None) -> Grid:
    """A copy of ``grid`` keeping only the named datasets/backbones/methods/seeds (None keeps all).

    Run keys depend on the configuration only, so a subset writes into the same run directories and
    results file as the whole grid: run the cheap methods now and the rest later (or elsewhere), and the
    report of the whole grid lists what is still missing. A name the grid does not have is an error.

    A method name keeps every entry of that method (``kar`` keeps ``kar[source=oracle]`` too); an
    entry with settings keeps that entry only, and ``NAME[]`` the entry without settings only.

    Example:
        >>> g = load_grid({"backbones": ["din", "dcnv2"], "methods": ["base", "kar", "kar[source=oracle]", "coco"],
        ...                "seeds": [0, 1]})
        >>> s = subset_grid(g, methods="base,kar", seeds="1")
        >>> s.backbones, s.methods, s.seeds
        (['din', 'dcnv2'], ['base', 'kar', 'kar[source=oracle]'], [1])
        >>> subset_grid(g, methods="kar[]").methods
        ['kar']
    """
    def keep(have: list, wanted: list, what: str, match: Callable[[Any, Any], bool] = lambda h, w: h == w) -> list:
        unknown = [w for w in wanted if not any(match(h, w) for h in have)]
        if unknown:
            raise GridError(f"--{what}: {', '.join(map(str, unknown))} not in the grid "
                            f"(it has {', '.join(map(str, have))})")
        return [h for h in have if any(match(h, w) for w in wanted)]

    def same_method(entry: str, wanted: str) -> bool:
        if wanted.endswith("[]"):   # the entry without settings only
            return entry == wanted[:-2]
        return entry == wanted or ("[" not in wanted and parse_method_entry(entry)[0] == wanted)

    out = _replace(grid)
    if datasets is not None:
        out.datasets = keep(grid.datasets, _str_list(datasets, "datasets"), "datasets")
    if backbones is not None:
        out.backbones = keep(grid.backbones, [b.lower() for b in _str_list(backbones, "backbones")], "backbones")
    if methods is not None:
        out.methods = keep(grid.methods, [m if m.endswith("[]") else _canonical_entry(m)
                                          for m in _split_entries(methods)], "methods", same_method)
    if seeds is not None:
        out.seeds = keep(grid.seeds, _int_list(seeds, "seeds"), "seeds")
    if split_seeds is not None:
        if grid.split_seeds is None:
            raise GridError("--splits: this grid has no split_seeds axis")
        out.split_seeds = keep(grid.split_seeds, _int_list(split_seeds, "splits"), "splits")
    # overrides for backbones/methods no longer in the subset would fail expand_grid's "matches nothing" check
    out.backbone_overrides = {p: ov for p, ov in grid.backbone_overrides.items()
                              if any(_matches(p, b) for b in out.backbones)}
    out.method_overrides = {p: ov for p, ov in grid.method_overrides.items()
                            if any(_entry_matches(p, m) for m in out.methods)}
    return out


def _entry_matches(pattern: str, entry: str) -> bool:
    return _matches(pattern, entry) or _matches(pattern, parse_method_entry(entry)[0])


# ----------------------------------------------------------------------------- expansion
def _matches(pattern: str, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p.strip().lower()) for p in pattern.split(",") if p.strip())


def _merge(*parts: Sections) -> Sections:
    out: Sections = {}
    for p in parts:
        for section, kv in p.items():
            out.setdefault(section, {}).update(kv)
    return out


def _slug(s: str) -> str:
    s = Path(s).name if ("/" in s or "\\" in s) else s
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "data"


def available_methods() -> tuple[set[str], str | None]:
    """Registered method names, and an import error of a half-built method module (if any)."""
    from cocorec.knowledge.base import METHODS, import_methods

    err = None
    try:
        import_methods()
    except Exception as e:  # a method module that exists but does not import: its methods are unavailable
        err = f"{type(e).__name__}: {e}"
    return set(METHODS), err


def default_out_dir(grid: Grid) -> str:
    return grid.out_dir or str(Path("runs") / "bench" / _slug(grid.name))


def default_results(grid: Grid, out_dir: str | None = None) -> str:
    return grid.results or str(Path(out_dir or default_out_dir(grid)) / "results.jsonl")


def expand_grid(grid: Grid, out_dir: str | None = None, results: str | None = None,
                quiet: bool = False) -> list[PlannedRun]:
    """The grid's runs in execution order (dataset, split, seed, backbone, method): the first split and
    seed of every cell first.

    Raises ConfigError for a bad override of an available method/backbone; an unregistered method
    becomes a PlannedRun with ``error`` set (reported, never fatal).
    """
    from cocorec.models import MODELS
    from cocorec.train.run import RunConfig

    out_root = Path(out_dir or default_out_dir(grid))
    results = results or default_results(grid, str(out_root))
    registered, import_err = available_methods()
    for b in grid.backbones:
        if b not in MODELS:
            raise GridError(f"unknown backbone {b!r} (one of {', '.join(sorted(MODELS))})")
    for pat in list(grid.backbone_overrides):
        if not any(_matches(pat, b) for b in grid.backbones):
            raise GridError(f"backbone_overrides: {pat!r} matches no backbone of the grid")
    for pat in list(grid.method_overrides):
        if not any(_entry_matches(pat, m) for m in grid.methods):
            raise GridError(f"method_overrides: {pat!r} matches no method of the grid")
    plans: list[PlannedRun] = []
    for dataset in grid.datasets:
        for split in (grid.split_seeds or [None]):
            for seed in grid.seeds:
                for backbone in grid.backbones:
                    for entry in grid.methods:
                        plans.append(_plan(grid, RunConfig, dataset, split, seed, backbone, entry, out_root,
                                           results, quiet, registered, import_err))
    return plans


def _plan(grid: Grid, run_config: Any, dataset: str, split: int | None, seed: int, backbone: str, entry: str,
          out_root: Path, results: str, quiet: bool, registered: set[str], import_err: str | None) -> PlannedRun:
    """One cell of the grid: its merged settings, checked; its run key and output directory."""
    method, own = parse_method_entry(entry)
    sections = _merge(grid.overrides,
                      *[ov for pat, ov in grid.backbone_overrides.items() if _matches(pat, backbone)],
                      *[ov for pat, ov in grid.method_overrides.items() if _entry_matches(pat, entry)],
                      {"method": own} if own else {},
                      {"protocol": {"split_seed": str(split)}} if split is not None else {})
    base_cfg = run_config(dataset=dataset, backbone=backbone, method=method, seed=seed, data_dir=grid.data_dir,
                          results=results, quiet=quiet, label_keys=tuple(sorted(own)))
    error = None
    if method not in registered:
        error = f"method {method!r} is not available (registered: {', '.join(sorted(registered))})"
        if import_err:
            error += f"; a method module failed to import: {import_err}"
        sections = {k: v for k, v in sections.items() if k != "method"}
    try:
        cfg = base_cfg.with_overrides(sections)
    except ConfigError as e:
        raise GridError(f"{dataset} {backbone} {entry}: {e}") from None
    key = cfg.key()
    part = f"-p{split}" if split is not None else ""
    output = out_root / _slug(dataset) / f"{backbone}-{_slug(entry)}{part}-s{seed}-{key[:8]}"
    cfg = _replace(cfg, output=str(output))
    label = entry if error else cfg.method_label()
    return PlannedRun(dataset, backbone, label, seed, str(output), key, config=None if error else cfg, error=error,
                      status="unavailable" if error else "todo", split_seed=split)


def _replace(cfg: Any, **kw: Any) -> Any:
    from dataclasses import replace
    return replace(cfg, **kw)


# ----------------------------------------------------------------------------- cache state
def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Lines of a JSONL file that parse as JSON objects (a torn or foreign line is skipped)."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def _metrics_key(directory: str | Path | None) -> str | None:
    if not directory:
        return None
    p = Path(directory) / "metrics.json"
    try:
        return (json.loads(p.read_text(encoding="utf-8")).get("config") or {}).get("run_key")
    except (OSError, ValueError, AttributeError):
        return None


def plan_status(plans: list[PlannedRun], results: str | Path) -> list[PlannedRun]:
    """Mark runs ``cached`` whose key has a results line and a matching ``metrics.json``."""
    outputs_by_key: dict[str, list[str]] = {}
    for rec in read_jsonl(results):
        if rec.get("run_key"):
            outputs_by_key.setdefault(rec["run_key"], []).append(rec.get("output") or "")
    for p in plans:
        if p.error:
            p.status = "unavailable"
            continue
        candidates = [p.output] + outputs_by_key.get(p.key, [])
        cached = p.key in outputs_by_key and any(_metrics_key(d) == p.key for d in dict.fromkeys(candidates))
        p.status = "cached" if cached else "todo"
    return plans


# ----------------------------------------------------------------------------- running
def failures_path(results: str | Path) -> Path:
    return Path(results).with_name("failures.jsonl")


def record_failure(results: str | Path, plan: PlannedRun, error: BaseException | str, tb: str = "") -> None:
    from cocorec.train.run import append_result, git_sha

    msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    append_result(failures_path(results), {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git_sha": git_sha(),
        "dataset": plan.dataset, "backbone": plan.backbone, "method": parse_method_entry(plan.method)[0],
        "variant": plan.method, "split_seed": plan.split_seed, "seed": plan.seed,
        "run_key": plan.key, "output": plan.output, "error": msg.strip()[:2000], "traceback": tb[-4000:]})


def _free_memory() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


@dataclass
class BenchSummary:
    results: str
    runs: list[PlannedRun]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)   # run key -> test metrics of runs done now
    errors: dict[str, str] = field(default_factory=dict)               # run key -> error line

    def count(self, status: str) -> int:
        return sum(p.status == status for p in self.runs)

    @property
    def ok(self) -> bool:
        return not any(p.status in ("failed", "unavailable") for p in self.runs)

    def line(self) -> str:
        parts = [f"{self.count(s)} {s}" for s in ("done", "cached", "failed", "unavailable", "todo") if self.count(s)]
        return f"{len(self.runs)} runs: " + ", ".join(parts)


def format_plan(plans: Iterable[PlannedRun]) -> str:
    """A plain-text table of the runs and their status (for ``--dry-run``)."""
    plans = list(plans)
    rows = [("#", "dataset", "backbone", "method", "split", "seed", "run key", "status", "output / reason")]
    for i, p in enumerate(plans, 1):
        rows.append((str(i), p.dataset, p.backbone, p.method, "-" if p.split_seed is None else str(p.split_seed),
                     str(p.seed), p.key, p.status, p.error if p.error else p.output))
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]) - 1)]
    return "\n".join(("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]).rstrip() for r in rows)


def estimate_todo(plans: Iterable[PlannedRun], results: str | Path) -> tuple[float, int, list[str]]:
    """Rough wall time of the ``todo`` runs from the finished runs in ``results``.

    Each todo run takes the mean ``cost.wall_seconds`` of finished runs of the same dataset, backbone
    and method, else of the same dataset and method (any backbone). Returns (seconds, runs estimated,
    labels "dataset method" with nothing to estimate from). Finished runs may come from another machine:
    the figure is a guide, not a promise.
    """
    walls: dict[tuple, list[float]] = {}
    for r in read_jsonl(results):
        w = (r.get("cost") or {}).get("wall_seconds")
        m = r.get("variant") or r.get("method")
        if isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0:
            for k in ((r.get("dataset"), r.get("backbone"), m), (r.get("dataset"), m)):
                walls.setdefault(k, []).append(float(w))
    total, n, unknown = 0.0, 0, []
    for p in plans:
        if p.status != "todo":
            continue
        ws = walls.get((p.dataset, p.backbone, p.method)) or walls.get((p.dataset, p.method))
        if ws:
            total += sum(ws) / len(ws)
            n += 1
        else:
            unknown.append(f"{p.dataset} {p.method}")
    return total, n, list(dict.fromkeys(unknown))


def check_shard(i: int, n: int) -> tuple[int, int]:
    """``(i, n)`` if ``0 <= i < n``, else a :class:`GridError`."""
    if not (n >= 1 and 0 <= i < n):
        raise GridError(f"shard must be I/N with 0 <= I < N (got {i}/{n})")
    return i, n


def run_grid(grid: Grid, out_dir: str | None = None, results: str | None = None, quiet: bool = False,
             dry_run: bool = False, log: Callable[[str], None] = print,
             runner: Callable[..., dict[str, Any]] | None = None,
             data_fn: Callable[[Any], Any] | None = None,
             shard: tuple[int, int] | None = None) -> BenchSummary:
    """Run every run of ``grid`` that is not cached; failures are recorded and the grid goes on.

    ``shard=(i, n)``: run only the runs whose position in the expanded grid is ``i`` modulo ``n``,
    so ``n`` processes (or machines) sharing one results file split a grid between them; the
    results line is a single append, so concurrent shards never interleave lines.

    ``runner`` (default :func:`cocorec.train.run.run`) is called as ``runner(cfg, data=data_fn(cfg))``;
    the default ``data_fn`` prepares each dataset once and shares it between consecutive runs.
    KeyboardInterrupt stops the grid (rerun the same command to resume).
    """
    out_dir = out_dir or default_out_dir(grid)
    results = results or default_results(grid, out_dir)
    plans = plan_status(expand_grid(grid, out_dir=out_dir, results=results, quiet=quiet), results)
    if shard is not None:
        i, n = check_shard(*shard)
        plans = plans[i::n]
    summary = BenchSummary(results=str(results), runs=plans)
    if dry_run:
        _log_dry_run(plans, results, summary, log)
        return summary
    if runner is None:
        from cocorec.train.run import run as runner
    data_cache: dict[str, Any] = {}
    if data_fn is None:
        def data_fn(cfg: Any) -> Any:
            return _data_for(cfg, data_cache)
    _run_plans(grid, plans, results, summary, runner, data_fn, log)
    return summary


def _log_dry_run(plans: list[PlannedRun], results: str | Path, summary: BenchSummary,
                 log: Callable[[str], None]) -> None:
    """What is done, what is left, and about how long the rest takes."""
    log(format_plan(plans))
    secs, n_est, unknown = estimate_todo(plans, results)
    parts = []
    if n_est:
        parts.append(f"~{secs / 3600:.1f} h for {n_est} run(s), by the mean wall time of finished runs of the "
                     f"same dataset and method (and backbone where there is one; other machines count too)")
    if unknown:
        parts.append(f"nothing to estimate from for: {', '.join(unknown)}")
    if parts:
        log("todo: " + "; ".join(parts))
    log(f"{summary.line()}  (results: {results})")


def _run_plans(grid: Grid, plans: list[PlannedRun], results: str | Path, summary: BenchSummary,
               runner: Callable[..., dict[str, Any]], data_fn: Callable[[Any], Any],
               log: Callable[[str], None]) -> None:
    """Run every planned run that is todo, one after the other; a failure is recorded and the grid goes on."""
    todo = sum(p.status == "todo" for p in plans)
    n = 0
    log(f"bench {grid.name}: {len(plans)} runs, {todo} to run, {sum(p.status == 'cached' for p in plans)} cached, "
        f"{sum(p.status == 'unavailable' for p in plans)} unavailable; results -> {results}")
    for p in plans:
        if p.status == "unavailable":
            log(f"[skip] {p.label}: {p.error}")
            record_failure(results, p, p.error or "unavailable")
            summary.errors[p.key] = p.error or "unavailable"
            continue
        if p.status == "cached":
            continue
        n += 1
        prefix = f"[{n}/{todo}] {p.label}"
        log(f"{prefix} ...")
        t0 = time.perf_counter()
        try:
            metrics = runner(p.config, data=data_fn(p.config))
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the grid
            p.status = "failed"
            line = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
            summary.errors[p.key] = line
            record_failure(results, p, e, traceback.format_exc())
            log(f"{prefix} FAILED after {time.perf_counter() - t0:.0f}s: {line}")
        else:
            p.status = "done"
            test = (metrics or {}).get("test") or {}
            summary.metrics[p.key] = test
            auc = test.get("auc")
            log(f"{prefix} done in {time.perf_counter() - t0:.0f}s"
                + (f": test AUC {auc:.4f}, LogLoss {test.get('logloss', float('nan')):.4f}" if auc is not None else ""))
        finally:
            _free_memory()
    log(summary.line())


def _data_for(cfg: Any, cache: dict[str, Any]) -> Any:
    """Prepared data shared by consecutive runs of one dataset + protocol (one held at a time)."""
    from cocorec.data.protocol import prepare
    from cocorec.utils.io import key_of

    k = key_of(cfg.dataset, cfg.data_dir, cfg.download, asdict(cfg.protocol))
    if k not in cache:
        cache.clear()
        _free_memory()
        try:
            cache[k] = prepare(cfg.dataset, cfg.protocol, data_dir=cfg.data_dir, download=cfg.download)
        except Exception as e:
            cache[k] = e
    if isinstance(cache[k], Exception):
        raise cache[k]
    return cache[k]
