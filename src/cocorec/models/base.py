"""The base CTR model: shared embeddings, knowledge fields, and the model registry.

A backbone defines only its layers (``__init__``) and ``score(x)``; the embedding of raw
features, the knowledge fields and everything about training live here and in
:mod:`cocorec.train`.

Every backbone accepts any number of extra dense **knowledge fields** (``knowledge_dims``):
each is projected to the embedding size and becomes one more field (field-interaction
models) or one more input of the MLP (sequence models). ``knowledge=None`` gives zeros, which
is how the judge gets the prediction without knowledge, p0.

Example:
    >>> import torch
    >>> from cocorec.data.protocol import FeatureSpec
    >>> from cocorec.models import build_model
    >>> spec = FeatureSpec(n_items=50, n_tags=5, max_tags=3, max_hist_len=4,
    ...                    user_fields={"gender": 3}, item_fields={"decade": 4})
    >>> model = build_model("deepfm", spec, knowledge_dims=[8])
    >>> batch = random_batch(spec, batch_size=2)
    >>> model(batch, [torch.zeros(2, 8)]).shape
    torch.Size([2])
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from cocorec.data.protocol import FeatureSpec


@dataclass
class Inputs:
    """Embedded inputs of one batch, the same for every backbone.

    Shapes (B batch, T history length, d embedding dim, Di = item_fields * d):
      target  [B, Di]   target item: id, categorical fields, pooled tags, concatenated
      hist    [B, T, Di] behaviour sequence items (+ their rating embedding)
      mask    [B, T]    True where the history position holds an item
      user    [B, Fu, d] user profile fields
      knowledge [B, Fk, d] projected knowledge fields (Fk may be 0)
    """

    target: torch.Tensor
    hist: torch.Tensor
    mask: torch.Tensor
    user: torch.Tensor
    knowledge: torch.Tensor
    d: int

    def hist_pool(self) -> torch.Tensor:
        """Mean of the history item vectors over valid positions: [B, Di]."""
        m = self.mask.unsqueeze(-1).to(self.hist.dtype)
        return (self.hist * m).sum(1) / m.sum(1).clamp_min(1.0)

    def fields(self) -> torch.Tensor:
        """All inputs as [B, F, d] fields, for field-interaction models (FM, CIN, attention)."""
        b = self.target.shape[0]
        parts = [self.target.view(b, -1, self.d), self.hist_pool().view(b, -1, self.d), self.user, self.knowledge]
        return torch.cat(parts, dim=1)

    def flat(self) -> torch.Tensor:
        """All fields flattened to [B, F * d]."""
        return self.fields().flatten(1)


def mlp(in_dim: int, hidden: Sequence[int], dropout: float = 0.0, out_dim: int | None = None,
        activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """A plain MLP: Linear-activation-dropout per hidden layer, optional linear output."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), activation()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = h
    if out_dim is not None:
        layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class BaseModel(nn.Module):
    """Embeddings of every feature + knowledge projection; subclasses implement ``score``."""

    name = "base"

    def __init__(self, spec: FeatureSpec, knowledge_dims: Sequence[int] = (), embedding_dim: int = 16,
                 **_: Any) -> None:
        super().__init__()
        self.spec = spec
        self.d = embedding_dim
        self.knowledge_dims = list(knowledge_dims)
        d = embedding_dim
        self.item_emb = nn.Embedding(spec.n_items, d, padding_idx=0)
        self.tag_emb = nn.Embedding(spec.n_tags, d, padding_idx=0)
        self.item_field_embs = nn.ModuleList(nn.Embedding(n, d, padding_idx=0) for n in spec.item_fields.values())
        self.user_field_embs = nn.ModuleList(nn.Embedding(n, d, padding_idx=0) for n in spec.user_fields.values())
        self.n_item_fields = 2 + len(spec.item_fields)       # id, tags, categorical fields
        self.item_dim = self.n_item_fields * d
        self.rating_emb = nn.Embedding(spec.n_ratings, self.item_dim, padding_idx=0)
        self.knowledge_proj = nn.ModuleList(nn.Linear(k, d) for k in self.knowledge_dims)
        self.n_user_fields = len(spec.user_fields)
        self.n_knowledge = len(self.knowledge_dims)
        # Fields seen by field-interaction models: target item, pooled history, user, knowledge.
        self.num_fields = 2 * self.n_item_fields + self.n_user_fields + self.n_knowledge
        for emb in [self.item_emb, self.tag_emb, *self.item_field_embs, *self.user_field_embs, self.rating_emb]:
            nn.init.normal_(emb.weight, std=1e-2 if emb is not self.rating_emb else 1e-3)
            with torch.no_grad():
                emb.weight[0].zero_()

    # ------------------------------------------------------------------ embeddings
    def item_vectors(self, items: torch.Tensor, feats: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        """[..., Di] item representation: id, mean tag embedding, categorical field embeddings."""
        table = getattr(self, "item_table", None)
        if table is not None:   # made by for_inference from the features of every item
            return table[items]
        tag_mask = (tags > 0).unsqueeze(-1).to(self.tag_emb.weight.dtype)
        tag_vec = (self.tag_emb(tags) * tag_mask).sum(-2) / tag_mask.sum(-2).clamp_min(1.0)
        parts = [self.item_emb(items), tag_vec] + [emb(feats[..., j]) for j, emb in enumerate(self.item_field_embs)]
        return torch.cat(parts, dim=-1)

    def embed(self, batch: dict[str, torch.Tensor], knowledge: Sequence[torch.Tensor] | None = None) -> Inputs:
        target = self.item_vectors(batch["item"], batch["item_feats"], batch["item_tags"])
        hist = self.item_vectors(batch["hist_items"], batch["hist_feats"], batch["hist_tags"])
        hist = hist + self.rating_emb(batch["hist_ratings"])
        uf = batch["user_feats"]
        user = torch.stack([emb(uf[:, j]) for j, emb in enumerate(self.user_field_embs)], dim=1)
        b = target.shape[0]
        if self.n_knowledge:
            if knowledge is None:
                knowledge = [torch.zeros(b, k, device=target.device, dtype=target.dtype) for k in self.knowledge_dims]
            if len(knowledge) != self.n_knowledge:
                raise ValueError(f"{self.name}: expected {self.n_knowledge} knowledge fields, got {len(knowledge)}")
            kn = torch.stack([proj(k.to(target.dtype)) for proj, k in zip(self.knowledge_proj, knowledge)], dim=1)
        else:
            kn = target.new_zeros(b, 0, self.d)
        return Inputs(target=target, hist=hist, mask=batch["hist_mask"], user=user, knowledge=kn, d=self.d)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, torch.Tensor], knowledge: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [B] (apply sigmoid for probabilities)."""
        return self.score(self.embed(batch, knowledge)).squeeze(-1)

    def score(self, x: Inputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def for_inference(self, item_feats: torch.Tensor | None = None,
                      item_tags: torch.Tensor | None = None) -> "BaseModel":
        """A copy in eval mode that gives this model's logits (to float rounding) with less work, for serving
        (:class:`cocorec.serve.bundle.BundleScorer` traces it and checks it against this model).

        ``item_feats`` [n_items, F] and ``item_tags`` [n_items, max_tags], the features of every item id
        (row 0: padding), make the item vectors a table computed once: a batch whose item features are
        those rows (as the bundle builds its batches) then looks its items up instead of pooling tags for
        every history position of every row. Backbones add their own folds (:meth:`DIN.for_inference`)."""
        m = copy.deepcopy(self).eval()
        if item_feats is not None and item_tags is not None:
            with torch.no_grad():
                ids = torch.arange(item_feats.shape[0], device=item_feats.device)
                m.register_buffer("item_table", self.item_vectors(ids, item_feats, item_tags))
        return m

    def add_loss(self) -> torch.Tensor | None:
        """The backbone's own auxiliary loss from its last training forward (FuxiCTR's ``add_loss``), or
        None; the trainer adds it to the method's loss (e.g. DIEN's interest-extractor loss)."""
        return None

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters of embedding tables (excluded from weight decay)."""
        return [p for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)]


MODELS: dict[str, type[BaseModel]] = {}


def register(name: str) -> Callable[[type[BaseModel]], type[BaseModel]]:
    def deco(cls: type[BaseModel]) -> type[BaseModel]:
        cls.name = name
        MODELS[name] = cls
        return cls
    return deco


def build_model(name: str, spec: FeatureSpec, knowledge_dims: Sequence[int] = (), **kwargs: Any) -> BaseModel:
    """Build a backbone by its paper name (din, dien, dcnv2, deepfm, autoint, xdeepfm)."""
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown backbone {name!r}; one of {sorted(MODELS)}")
    return MODELS[key](spec, knowledge_dims=knowledge_dims, **kwargs)


def random_batch(spec: FeatureSpec, batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random valid batch for tests and examples."""
    g = torch.Generator().manual_seed(seed)
    T, B = spec.max_hist_len, batch_size
    r = lambda n, *shape: torch.randint(1, max(n, 2), shape, generator=g)  # noqa: E731
    hist = r(spec.n_items, B, T)
    hist[0, : T // 2] = 0  # left padding in one row
    item_feats = torch.stack([r(n, spec.n_items) for n in spec.item_fields.values()], -1) if spec.item_fields \
        else torch.zeros(spec.n_items, 0, dtype=torch.long)
    tags = r(spec.n_tags, spec.n_items, spec.max_tags)
    item = r(spec.n_items, B)
    return {
        "user": torch.arange(B), "item": item, "label": (torch.rand(B, generator=g) > 0.5).float(),
        "user_feats": torch.stack([r(n, B) for n in spec.user_fields.values()], -1),
        "item_feats": item_feats[item], "item_tags": tags[item],
        "hist_items": hist, "hist_feats": item_feats[hist], "hist_tags": tags[hist] * (hist > 0).unsqueeze(-1),
        "hist_ratings": r(6, B, T) * (hist > 0), "hist_mask": hist > 0,
    }
