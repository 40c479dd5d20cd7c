"""Serving: load a trained run and score (user, item) pairs without re-running training.

``load_scorer`` rebuilds a run (method and all); ``export_bundle`` writes a bundle of it and
``BundleScorer`` scores from the bundle alone (no method, no LM); ``create_app`` serves a bundle over
HTTP. Imported on first use: the command line builds its parser without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BundleScorer", "Scorer", "create_app", "export_bundle", "load_scorer"]

_WHERE = {"Scorer": "scorer", "load_scorer": "scorer", "BundleScorer": "bundle", "export_bundle": "bundle",
          "create_app": "app"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"cocorec.serve.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'cocorec.serve' has no attribute {name!r}")
