"""``field``: a knowledge source as a plain numeric vector per user, no LM: the ceiling of that source.

``--method field --set method.source=oracle|template``. The vector of every user
(:meth:`~cocorec.knowledge.sources.UserSource.vectors`) is z-scored with the statistics of the
training users and fed as one knowledge field; the backbone's own knowledge projection is the only
thing that learns from it. Whatever an LM method does with the same source (``kar`` / ``coco`` with
``method.source=oracle``) is measured against this: a method that recovers little of the field's
gain loses the signal somewhere on its way.

Example:
    >>> m = FieldMethod(source="oracle")
    >>> from cocorec.data.protocol import FeatureSpec
    >>> m.bind(FeatureSpec(n_items=10, n_tags=19, max_tags=3, max_hist_len=4))
    >>> m.knowledge_dims
    [19]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cocorec.knowledge.base import KnowledgeMethod, register_method
from cocorec.knowledge.sources import LEAK, check_source, check_view

__all__ = ["FieldMethod", "field_width"]


def field_width(source: str, n_genres: int) -> int:
    """Width of the numeric vector of ``source`` with ``n_genres`` genres (tags)."""
    return 1 + n_genres if source == "oracle" else 4 + 2 * n_genres


@register_method("field")
class FieldMethod(KnowledgeMethod):
    """One knowledge field holding the source's numeric vector of the sample's user.

    Config keys: ``source`` (``oracle`` or ``template``), ``corrupt`` (fraction of users whose vector
    is corrupted), ``corruption`` (``invert`` or ``swap``, see knowledge/sources.py),
    ``standardize`` (z-score with the training users' statistics; default on), ``view``
    (``full``: every number of the source; ``text``: the oracle's numbers as its text states them -
    the label rate and the top genres to a whole percent - the ceiling of an LM method reading that text;
    ``rate``: only the label rate the text states - the ceiling of a reader that misses the genre numbers).
    """

    name = "field"

    def __init__(self, source: str = "oracle", corrupt: float = 0.0, standardize: bool = True,
                 view: str = "full", corruption: str = "invert") -> None:
        super().__init__()
        check_source(self.name, source, corrupt, corruption)
        check_view(view, source)
        self.source, self.corrupt, self.standardize, self.view = source, float(corrupt), bool(standardize), view
        self.corruption = corruption
        self.register_buffer("user_vec", torch.zeros(0, 0))
        self.knowledge_names = ["user"]

    def bind(self, spec: Any) -> None:
        self.knowledge_dims = [field_width(self.source, spec.n_tags - 1)]

    def prepare(self, data: Any, output_dir: Path | None = None) -> None:
        vec = self.user_source(data).vectors(self.view)
        if vec.shape[1] != self.knowledge_dims[0]:
            raise RuntimeError(f"field: the data has {vec.shape[1]} features, the model was bound to "
                               f"{self.knowledge_dims[0]}")
        if self.standardize:
            ref = vec[np.unique(data.split("train").user)]
            vec = (vec - ref.mean(0)) / (ref.std(0) + 1e-6)
        self._buffers["user_vec"] = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32)).to(
            self.user_vec.device)

    def forward(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        if self.user_vec.shape[0] == 0:
            raise RuntimeError("field: no vectors; call prepare(data) or load a checkpoint first")
        return [self.user_vec[batch["user"].to(self.user_vec.device)]]

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        if "user_vec" in state:   # its size is known only from the data
            self._buffers["user_vec"] = state["user_vec"].to(self.user_vec.device)

    def config_dict(self) -> dict[str, Any]:
        return {"method": self.name, "source": self.source, "corrupt": self.corrupt,
                **({"corruption": self.corruption} if self.corruption != "invert" else {}),
                "standardize": self.standardize,
                **({"view": self.view} if self.view != "full" else {}),
                **({"leak": LEAK} if self.source == "oracle" else {})}
