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

import torch
from torch import nn

ADAPTER = "coco"


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
