"""Serving: load a trained run and score (user, item) pairs without re-running training."""

from cocorec.serve.scorer import Scorer, load_scorer

__all__ = ["Scorer", "load_scorer"]
