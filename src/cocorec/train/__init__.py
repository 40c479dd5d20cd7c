"""Training: the one fit / evaluate / early-stopping / checkpoint loop, and full runs."""

from cocorec.train.trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
