"""LoRA adapters on the LM (peft), their state, and a cheap fingerprint of their weights.

Adapters are injected in place (``peft.inject_adapter_in_model``), so the LM runtime's
``hidden_states`` runs through them with no wrapper. Dropout is 0: the cached user-text KV must
equal what a forward pass computes. ``lora_B`` starts at zero, so the adapted LM starts equal to
the frozen one.

Example:
    >>> from cocorec.knowledge.lm import tiny_lm
    >>> lm = tiny_lm()
    >>> params = add_lora(lm.model, rank=2, targets=("q_proj", "v_proj"))
    >>> len(params) == 2 * 2 * 2           # 2 layers x 2 modules x (A, B)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cocorec.config import ConfigError

ADAPTER = "coco"
LORA_SCOPES = ("all", "suffix")


@dataclass
class LoRAConfig:
    """The adapters' settings (config keys: ``--set method.lora_rank=4``).

    ``lora_scope``: ``all`` adapts the LM wherever it runs (the user-text caches are rebuilt after a
    contradiction phase); ``suffix`` reads the text with the base LM and adapts the prompt positions only.

    Example:
        >>> LoRAConfig(lora_targets="q_proj, v_proj").targets
        ('q_proj', 'v_proj')
    """

    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,v_proj"   # comma-separated module names
    lora_scope: str = "all"
    lora_lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.lora_scope not in LORA_SCOPES:
            raise ConfigError(f"lora_scope must be one of {LORA_SCOPES} (got {self.lora_scope!r})")
        if self.lora_rank < 1 or self.lora_lr <= 0 or not self.targets:
            raise ConfigError("lora_rank must be >= 1, lora_lr > 0 and lora_targets name a module")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = ("q_proj", "v_proj"),
             seed: int = 0) -> dict[str, nn.Parameter]:
    """Inject LoRA adapters into ``model``; returns ``{name: parameter}`` of the adapters (trainable)."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    params = lora_parameters(model)
    if not params:
        raise ValueError(f"no LoRA target module among {list(targets)} in {type(model).__name__}")
    for p in params.values():
        p.requires_grad_(True)
    return params


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@torch.no_grad()
def fingerprint(params: Sequence[torch.Tensor]) -> tuple[float, ...]:
    """Two numbers that change whenever any adapter weight changes (used to version KV caches)."""
    if not params:
        return ()
    flat = torch.cat([p.detach().flatten().double().cpu() for p in params])
    w = torch.arange(1, len(flat) + 1, dtype=torch.float64).remainder_(97.0).add_(1.0)
    return (float(flat.sum()), float((flat * w).sum()))
