"""The knowledge-method plug-in interface: every method works on every backbone.

A method turns a batch into zero or more dense knowledge fields (``knowledge_dims``), may add
auxiliary losses, and may take over the training step (CoCo's judge does). ``build_method`` gives
it the run's seed (``method.seed``: every draw of the method follows it). The contract, in order:

* ``bind(spec)`` before the backbone is built (a field width that depends on the data);
* ``build(backbone, data, output_dir, state)``: the one step that makes it ready - it attaches to
  the backbone (``attach``: e.g. CoCo loads its LM and builds its modules), restores a checkpoint's
  ``state`` when serving, then prepares for the data (``prepare``: generate/encode/cache what it
  needs; what the checkpoint restored is not recomputed). The trainer and the scorer call it;
* ``training_loss(model, batch, step)`` per step -> (the method's loss, logs); the trainer adds the
  backbone's own auxiliary loss (``model.add_loss()``) and the regularisers;
* ``on_epoch_start(epoch, steps)`` and ``on_epoch_end(epoch)``; ``on_fit_end(predict)`` once the best weights are back, with
  ``predict(split, use_knowledge)`` -> ``{"prob", "label", "user"}`` (CoCo's group guard);
* ``forward(batch)`` for evaluation -> list of knowledge tensors (or None for no knowledge);
* ``diagnostics()`` after training -> JSON-able dict written with the metrics.

Example:
    >>> m = build_method("base")
    >>> m.knowledge_dims
    []
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


class KnowledgeMethod(nn.Module):
    """Base class: no knowledge (``base``). Subclasses override what they need."""

    name = "base"
    #: Whether a checkpoint holds all the method computes from the data (then serving skips prepare).
    serves_from_checkpoint = True

    def __init__(self) -> None:
        super().__init__()
        self.knowledge_dims: list[int] = []
        self.knowledge_names: list[str] = []  # one name per knowledge field (diagnostics)
        self.seed = 0                       # the run's seed, set by build_method
        self.progress: bool | None = None   # long steps' progress: None a bar or log lines, False none (the trainer's quiet)
        self.source, self.corrupt, self.corruption = "lm", 0.0, "invert"
        self._source: Any = None            # the UserSource, built in prepare (methods with a source)

    def bind(self, spec: Any) -> None:
        """Called with the data's :class:`~cocorec.data.protocol.FeatureSpec` before the backbone is built."""

    def user_source(self, data: Any) -> Any:
        """The run's :class:`~cocorec.knowledge.sources.UserSource` (source, corruption, seed) for ``data``."""
        from cocorec.knowledge.sources import UserSource

        if self._source is None or self._source.data is not data:
            self._source = UserSource(data, self.source, self.corrupt, self.seed, self.corruption)
        return self._source

    def user_groups(self) -> dict[str, list[str]]:
        """Groupings of users the method defines (``corrupt`` with ``corrupt > 0``), per user index."""
        return self._source.groups() if self._source is not None else {}

    def build(self, backbone: nn.Module, data: Any, output_dir: Path | None = None,
              state: dict[str, torch.Tensor] | None = None) -> None:
        """Attach to ``backbone``, restore ``state`` (a checkpoint's ``method/`` tensors) if given, then
        prepare for ``data``; a restored method that keeps everything it computes from the data in its
        checkpoint (:attr:`serves_from_checkpoint`: KAR's vectors) is not prepared again. The one step
        the trainer and the scorer call."""
        self.attach(backbone)
        if state is not None:
            self.load_checkpoint_state(state)
        if data is not None and (state is None or not self.serves_from_checkpoint):
            self.prepare(data, output_dir)

    def attach(self, model: nn.Module) -> None:
        """Part of :meth:`build`: the backbone (CoCo builds its query from the backbone's embeddings).

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

    def on_fit_end(self, predict: Callable[..., dict[str, Any]]) -> None:
        """Called once after the best weights are restored, with ``predict(split, use_knowledge=True)``
        (e.g. CoCo's group guard compares validation predictions with and without knowledge)."""

    def prepare(self, data: Any, output_dir: Path | None = None) -> None:
        """Part of :meth:`build`: precompute what the method needs (texts, vectors, caches)."""

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
        return loss, logs

    def on_epoch_start(self, epoch: int, steps: int) -> None:
        """Hook for schedules: the epoch about to run has ``steps`` optimizer steps."""

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


def build_method(name: str, seed: int = 0, **kwargs: Any) -> KnowledgeMethod:
    """The method ``name`` built from its config keys, with the run's ``seed`` (not a config key).

    Construction runs under ``seed`` (KAR's adaptor initialises its weights there) and leaves the
    global random state as it found it: a method's initial weights never depend on what the process
    drew before (e.g. the runs before it in a grid).
    """
    import_methods()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; one of {sorted(METHODS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        method = METHODS[name](**kwargs)
    method.seed = int(seed)
    return method


def format_setting(v: Any) -> str:
    """A setting's value as it is written in a method label: ``0.3``, ``true``, ``oracle``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return f"{v:g}"
    if isinstance(v, str):
        if v.lower() in ("true", "false"):
            return v.lower()
        try:
            return f"{float(v):g}"
        except ValueError:
            return v
    return str(v)


def method_label(method: str, args: Mapping[str, Any], shown: Iterable[str] = ()) -> str:
    """How a run's method is named in reports: the name, plus the settings that make it a variant:
    its knowledge source when not the LM's, a corruption, and the settings ``shown`` (a grid entry's).

    Example:
        >>> method_label("kar", {"source": "oracle"})
        'kar[source=oracle]'
        >>> method_label("kar", {"source": "lm", "standardize": True}, shown=["standardize"])
        'kar[standardize=true]'
        >>> method_label("base", {})
        'base'
    """
    import inspect

    import_methods()
    factory = METHODS.get(method)
    params = dict(inspect.signature(factory).parameters) if factory is not None else {}
    value = {k: args[k] if k in args else (params[k].default if k in params else None) for k in {*shown, *params}}
    keys = set(shown) | {k for k, neutral in (("source", "lm"), ("corrupt", 0.0), ("corruption", "invert"))
                         if k in params and value[k] != neutral}
    inner = ",".join(f"{k}={format_setting(value[k])}" for k in sorted(keys))
    return f"{method}[{inner}]" if inner else method


def check_method_args(name: str, args: dict[str, Any]) -> None:
    """Checks of a method's settings that need no data (its knowledge source); a ConfigError if bad."""
    import inspect

    from cocorec.knowledge.sources import check_source

    factory = METHODS.get(name)
    if factory is None:
        return
    params = inspect.signature(factory).parameters
    if "source" in params:
        check_source(name, args.get("source", params["source"].default),
                     args.get("corrupt", params["corrupt"].default if "corrupt" in params else 0.0),
                     args.get("corruption", params["corruption"].default if "corruption" in params else "invert"))


#: The built-in methods and the module that defines each (imported on first use: they pull in
#: transformers). ``register_method`` adds a user's own method beside them.
BUILTIN_METHODS = {
    "base": "cocorec.knowledge.base",
    "field": "cocorec.knowledge.field",
    "kar": "cocorec.knowledge.kar", "kar-item": "cocorec.knowledge.kar", "r4ec": "cocorec.knowledge.kar",
    "coco": "cocorec.coco.method", "coco-novq": "cocorec.coco.method", "coco-nojudge": "cocorec.coco.method",
    "static": "cocorec.coco.method", "coco-oneprompt": "cocorec.coco.method",
}


def import_methods() -> None:
    """Import the modules of :data:`BUILTIN_METHODS`; each must define the methods listed for it."""
    import importlib

    for mod in sorted(set(BUILTIN_METHODS.values())):
        importlib.import_module(mod)
    missing = sorted(set(BUILTIN_METHODS) - set(METHODS))
    if missing:
        raise RuntimeError(f"built-in methods not defined by their modules: {missing}")
