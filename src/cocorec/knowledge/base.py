"""The knowledge-method plug-in interface: every method works on every backbone.

A method turns a batch into zero or more dense knowledge fields (``knowledge_dims``), may add
auxiliary losses, and may take over the training step (CoCo's judge does). The trainer calls:

* ``prepare(data, output_dir)`` once before training (generate/encode/cache what it needs);
* ``training_loss(model, batch, step)`` per step -> (loss, logs);
* ``forward(batch)`` for evaluation -> list of knowledge tensors (or None for no knowledge);
* ``diagnostics()`` after training -> JSON-able dict written with the metrics.

Example:
    >>> m = build_method("base")
    >>> m.knowledge_dims
    []
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


class KnowledgeMethod(nn.Module):
    """Base class: no knowledge (``base``). Subclasses override what they need."""

    name = "base"

    def __init__(self) -> None:
        super().__init__()
        self.knowledge_dims: list[int] = []

    def attach(self, model: nn.Module) -> None:
        """Called by the trainer with the backbone (CoCo builds its query from the backbone's embeddings).

        Stored outside the module tree so the backbone's weights are not saved twice.
        """
        object.__setattr__(self, "_backbone", model)

    @property
    def backbone(self) -> nn.Module | None:
        return getattr(self, "_backbone", None)

    def optimizer_groups(self) -> list[dict[str, Any]] | None:
        """Optional AdamW parameter groups for the method's own parameters (e.g. a separate LoRA lr).

        None: the trainer puts every trainable method parameter in its default groups.
        """
        return None

    def on_fit_end(self, trainer: Any) -> None:
        """Called once after the best checkpoint is restored (e.g. CoCo's group guard uses validation)."""

    def prepare(self, data: Any, output_dir: Path | None = None) -> None:
        """Precompute what the method needs (texts, vectors, caches). Called before training."""

    def forward(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
        return None

    def aux_loss(self, batch: dict[str, torch.Tensor], knowledge: list[torch.Tensor] | None) -> torch.Tensor | None:
        return None

    def training_loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
                      step: int) -> tuple[torch.Tensor, dict[str, float]]:
        knowledge = self(batch)
        logits = model(batch, knowledge)
        loss = F.binary_cross_entropy_with_logits(logits, batch["label"])
        logs = {"bce": float(loss.detach())}
        aux = self.aux_loss(batch, knowledge)
        if aux is not None:
            loss = loss + aux
            logs["aux"] = float(aux.detach())
        return add_backbone_aux_loss(model, loss, logs), logs

    def on_epoch_end(self, epoch: int) -> None:
        """Hook for schedules (e.g. CoCo contradiction phases, cache rebuilds)."""

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Tensors saved in the checkpoint (large frozen parts like an LM are left out)."""
        return self.state_dict()

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=False)

    def diagnostics(self) -> dict[str, Any]:
        return {}

    def config_dict(self) -> dict[str, Any]:
        """The method's settings (JSON), stored in the checkpoint and the results line."""
        return {}


def add_backbone_aux_loss(model: nn.Module, loss: torch.Tensor, logs: dict[str, float]) -> torch.Tensor:
    """Add a backbone's own auxiliary loss (DIEN's interest-extractor loss), set during its forward."""
    aux = getattr(model, "aux_loss", None)
    if torch.is_tensor(aux) and aux.requires_grad:
        logs["backbone_aux"] = float(aux.detach())
        return loss + aux
    return loss


METHODS: dict[str, Callable[..., KnowledgeMethod]] = {"base": KnowledgeMethod}


def register_method(name: str) -> Callable[[Callable[..., KnowledgeMethod]], Callable[..., KnowledgeMethod]]:
    def deco(factory: Callable[..., KnowledgeMethod]) -> Callable[..., KnowledgeMethod]:
        METHODS[name] = factory
        return factory
    return deco


def register_variant(base: type, name: str, doc: str, **fixed: Any) -> type:
    """Register ``base`` under ``name`` with some constructor arguments fixed (no longer config keys).

    The variant is its own method in grids and reports (``coco-novq``, ``kar-item``); setting a fixed
    key on it is a config error, like any unknown key.
    """
    import inspect

    sig = inspect.signature(base.__init__)
    params = [p for n, p in sig.parameters.items() if n not in fixed]

    def __init__(self: Any, **kw: Any) -> None:
        base.__init__(self, **{**kw, **fixed})

    __init__.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    __init__.__annotations__ = {k: v for k, v in base.__init__.__annotations__.items() if k not in fixed}
    cls = type(f"{base.__name__}_{name.replace('-', '_')}", (base,),
               {"__init__": __init__, "name": name, "__doc__": doc, "__module__": base.__module__})
    register_method(name)(cls)
    return cls


def build_method(name: str, **kwargs: Any) -> KnowledgeMethod:
    import_methods()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; one of {sorted(METHODS)}")
    return METHODS[name](**kwargs)


def import_methods() -> None:
    """Import the modules that register methods (kept lazy: they pull in transformers)."""
    import importlib

    for mod in ("cocorec.knowledge.kar", "cocorec.coco.method"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a method module not built yet
            if not (e.name and mod.startswith(e.name)):
                raise
