"""Evaluation: AUC, LogLoss, GAUC, per-group metrics, RelaImpr."""

from cocorec.eval.metrics import auc, evaluate_predictions, gauc, group_metrics, logloss, rela_impr

__all__ = ["auc", "evaluate_predictions", "gauc", "group_metrics", "logloss", "rela_impr"]
