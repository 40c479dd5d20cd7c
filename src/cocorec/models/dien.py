"""DIEN (Zhou et al., 2019): Deep Interest Evolution Network.

1. **Interest extractor**: a GRU over the behaviour sequence (left-padded, most recent last).
   Padded steps are skipped (the state is carried over them unchanged), so padding never
   enters a state, whatever its content.
2. **Attention** of the target item over the extractor states (bilinear, softmax over the
   valid positions, as in the paper: ``a_t = softmax(h_t W e_target)``).
3. **Interest evolution**: an AUGRU (GRU whose update gate is scaled by the attention score,
   :class:`AUGRUCell`); its state after the last valid item is the evolved interest.
4. The evolved interest, the target, the user fields and the knowledge fields go through an MLP.

**Auxiliary loss** (paper section 4.2, off by default): with ``aux_loss_weight > 0`` the model,
in training mode, sets ``self.aux_loss`` in :meth:`score` to ``aux_loss_weight`` times the mean
binary cross-entropy of a small MLP telling the next clicked item ``e[t+1]`` (label 1) from a
negative (label 0) given the extractor state ``h[t]``. Negatives are the items at the same
position in the history of another row of the batch (a random permutation), since the batch
holds no sampled negatives. The training loop should add ``model.aux_loss`` to the CTR loss
(it is a zero scalar when disabled or in eval mode, so adding it unconditionally is safe).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cocorec.data.protocol import FeatureSpec
from cocorec.models.base import BaseModel, Inputs, register
from cocorec.models.din import dnn


class AUGRUCell(nn.Module):
    """GRU cell with an optional attentional update gate (DIEN eq. 15-16).

    ``r = sigmoid(W_r x + U_r h + b_r)``, ``u = sigmoid(W_u x + U_u h + b_u)``,
    ``h_tilde = tanh(W_h x + r * (U_h h + b_h') + b_h)``, ``h' = (1 - u') * h + u' * h_tilde``
    with ``u' = a * u`` (AUGRU) or ``u' = u`` without attention (a plain GRU, which is how the
    interest extractor uses it). With ``a = 0`` the state is kept.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.x2h = nn.Linear(input_size, 3 * hidden_size)
        self.h2h = nn.Linear(hidden_size, 3 * hidden_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor, att: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, I], h [B, H], att [B, 1] or None -> next state [B, H]."""
        return self.step(*self.x2h(x).chunk(3, dim=-1), h, att)

    def step(self, xr: torch.Tensor, xu: torch.Tensor, xn: torch.Tensor, h: torch.Tensor,
             att: torch.Tensor | None = None) -> torch.Tensor:
        """One step from the input projection ``x2h(x)`` split in three."""
        hr, hu, hn = self.h2h(h).chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        u = torch.sigmoid(xu + hu)
        if att is not None:
            u = u * att
        n = torch.tanh(xn + r * hn)
        return (1.0 - u) * h + u * n

    def run(self, seq: torch.Tensor, valid: torch.Tensor, att: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run over seq [B, T, I] from a zero state, skipping invalid steps (valid [B, T]; the state
        is carried over them unchanged). Returns the states [B, T, H] (0 at invalid steps) and the
        final state [B, H] (the state after the last valid step)."""
        b = seq.shape[0]
        # Input projections of all steps in one GEMM, split and unbound outside the loop
        # (slicing [:, t] per step would zero-fill a [B, T, 3H] gradient per step in the backward).
        xr, xu, xn = (g.unbind(1) for g in self.x2h(seq).chunk(3, dim=-1))
        vs = valid.unsqueeze(-1).unbind(1)
        atts = att.unsqueeze(-1).unbind(1) if att is not None else [None] * len(vs)
        h = seq.new_zeros(b, self.hidden_size)
        states = []
        for t, (v_t, a_t) in enumerate(zip(vs, atts)):
            h = torch.where(v_t, self.step(xr[t], xu[t], xn[t], h, a_t), h)
            states.append(h)
        return torch.stack(states, 1) * valid.unsqueeze(-1), h


@register("dien")
class DIEN(BaseModel):
    def __init__(self, spec: FeatureSpec, knowledge_dims: Sequence[int] = (), embedding_dim: int = 16,
                 hidden_units: Sequence[int] = (256, 128, 64), dropout: float = 0.1,
                 dnn_activation: str = "relu", gru_hidden: int | None = None,
                 aux_loss_weight: float = 0.0, aux_hidden_units: Sequence[int] = (100, 50), **kw: Any) -> None:
        super().__init__(spec, knowledge_dims, embedding_dim, **kw)
        di = self.item_dim
        hid = gru_hidden or di
        self.extractor = AUGRUCell(di, hid)                   # used as a plain GRU (no attention)
        self.att_w = nn.Linear(di, hid, bias=False)           # bilinear attention h_t W e_target
        self.evolution = AUGRUCell(hid, hid)
        self.aux_loss_weight = float(aux_loss_weight)
        # Created only when used: every parameter of the model must receive a gradient.
        self.aux_net = dnn(hid + di, aux_hidden_units, "relu", out_dim=1) if self.aux_loss_weight > 0 else None
        in_dim = hid + di + (self.n_user_fields + self.n_knowledge) * self.d
        self.dnn = dnn(in_dim, hidden_units, dnn_activation, dropout, out_dim=1)
        self.aux_loss: torch.Tensor = torch.zeros(())

    def evolved_interest(self, x: Inputs) -> torch.Tensor:
        """Final AUGRU state [B, H]; sets ``self.aux_loss``."""
        valid = x.mask
        states, _ = self.extractor.run(x.hist, valid)                        # [B, T, H], 0 at padding
        scores = torch.einsum("bth,bh->bt", states, self.att_w(x.target))
        att = torch.softmax(scores.masked_fill(~valid, torch.finfo(scores.dtype).min), dim=1) * valid
        _, h = self.evolution.run(states, valid, att)                        # 0 for rows without history
        self.aux_loss = self._aux_loss(states, x.hist, valid) if self.aux_net is not None and self.training \
            else states.new_zeros(())
        return h

    def add_loss(self) -> torch.Tensor | None:
        return self.aux_loss if self.aux_net is not None and self.training and self.aux_loss.requires_grad else None

    def _aux_loss(self, states: torch.Tensor, seq: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        assert self.aux_net is not None
        b = seq.shape[0]
        perm = torch.randperm(b, device=seq.device)
        neg, neg_valid = seq[perm], valid[perm]
        h = states[:, :-1]                                                   # h_t predicts e_{t+1}
        pair_mask = valid[:, :-1] & valid[:, 1:] & neg_valid[:, 1:]
        if not bool(pair_mask.any()):
            return states.new_zeros(())
        pos_logit = self.aux_net(torch.cat([h, seq[:, 1:]], -1)[pair_mask]).squeeze(-1)
        neg_logit = self.aux_net(torch.cat([h, neg[:, 1:]], -1)[pair_mask]).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit)) + \
            F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))
        return self.aux_loss_weight * loss

    def __getstate__(self) -> dict[str, Any]:
        # The last aux loss may hold an autograd graph, which copy.deepcopy / pickle refuse.
        state = super().__getstate__()
        state["aux_loss"] = torch.zeros(())
        return state

    def score(self, x: Inputs) -> torch.Tensor:
        parts = [self.evolved_interest(x), x.target, x.user.flatten(1), x.knowledge.flatten(1)]
        return self.dnn(torch.cat(parts, dim=-1))
