"""Typed configuration values and overrides that reject unknown keys and wrong types.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class C:
    ...     lr: float = 1e-3
    ...     epochs: int = 10
    >>> apply_overrides(C(), {"lr": "0.01"})
    C(lr=0.01, epochs=10)
    >>> apply_overrides(C(), {"lrr": "1"})
    Traceback (most recent call last):
    ...
    cocorec.config.ConfigError: unknown key 'lrr' for C (allowed: epochs, lr)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import types
import typing
from typing import Any, Callable, Mapping

from cocorec.errors import InputError


class ConfigError(InputError):
    """An override names an unknown key, gives a value of the wrong type, or a value out of its range."""


class RunError(InputError):
    """A run that cannot start or cannot be written: its output directory holds another run or is not
    writable, or a metric is not a number. The CLI prints it as one line and exits 2."""


def parse_value(raw: Any, annotation: Any, key: str) -> Any:
    """Parse a (string) value into the annotated type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return parse_value(raw, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: cannot parse {raw!r} as {annotation}")
    if annotation is Any or annotation is inspect.Parameter.empty:
        if isinstance(raw, str):
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                return raw
        return raw
    if origin in (tuple, list) or annotation in (tuple, list):
        if isinstance(raw, str):
            s = raw.strip()
            try:
                raw = json.loads(s if s.startswith("[") else f"[{s}]")
            except json.JSONDecodeError:
                raw = [x.strip() for x in s.strip("()[]").split(",") if x.strip()]
        if not isinstance(raw, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {raw!r}")
        elem = args[0] if args else Any
        vals = [parse_value(v, elem, key) for v in raw]
        return tuple(vals) if (origin is tuple or annotation is tuple) else vals
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {raw!r}")
    if annotation is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}: expected an integer, got {raw!r}")
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
    if annotation is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        try:
            return float(str(raw))
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
    if annotation is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{key}: expected a string, got {raw!r}")
        return raw
    if typing.get_origin(annotation) is typing.Literal:
        if raw not in args:
            raise ConfigError(f"{key}: expected one of {args}, got {raw!r}")
        return raw
    return raw


def apply_overrides(obj: Any, overrides: Mapping[str, Any]) -> Any:
    """Return a copy of dataclass ``obj`` with ``overrides`` applied (values parsed and checked)."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for k, v in overrides.items():
        if k not in names:
            raise ConfigError(f"unknown key '{k}' for {type(obj).__name__} (allowed: {', '.join(sorted(names))})")
        changes[k] = parse_value(v, hints[k], k)
    return dataclasses.replace(obj, **changes)


def check_kwargs(target: Callable[..., Any], overrides: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Check and parse keyword overrides against a constructor's signature (config keys = arguments)."""
    sig = inspect.signature(target)
    params = {n: p for n, p in sig.parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in ("self", "spec", "knowledge_dims")}
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:
        hints = {}
    out = {}
    for k, v in overrides.items():
        if k not in params:
            raise ConfigError(f"unknown key '{k}' for {what} (allowed: {', '.join(sorted(params))})")
        out[k] = parse_value(v, hints.get(k, params[k].annotation), k)
    return out


def check_value(name: str, value: Any, rule: str) -> None:
    """Check a numeric setting against ``rule``; a one-line ConfigError naming ``name`` if it fails.

    Rules: ``positive`` (> 0), ``non-negative`` (>= 0), ``at-least-1`` (>= 1), ``fraction`` (0 <= v <= 1),
    each optionally ``optional-...`` (None accepted). Numbers must be finite.

    Example:
        >>> check_value("train.lr", 0.001, "positive")
        >>> check_value("train.batch_size", 0, "positive")
        Traceback (most recent call last):
        ...
        cocorec.config.ConfigError: train.batch_size must be > 0, got 0
    """
    if rule.startswith("optional-"):
        if value is None:
            return
        rule = rule[len("optional-"):]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    ok, need = {"positive": (value > 0, "> 0"), "non-negative": (value >= 0, ">= 0"),
                "at-least-1": (value >= 1, ">= 1"), "fraction": (0 <= value <= 1, "between 0 and 1")}[rule]
    if not ok:
        raise ConfigError(f"{name} must be {need}, got {value!r}")


def parse_assignments(items: list[str] | None) -> dict[str, dict[str, str]]:
    """Parse ``section.key=value`` strings into {section: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=0.001)")
        k, v = item.split("=", 1)
        section, key = k.split(".", 1)
        out.setdefault(section.strip(), {})[key.strip()] = v.strip()
    return out
