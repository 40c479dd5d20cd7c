"""DIEN (Zhou et al., 2019): Deep Interest Evolution Network.

1. **Interest extractor**: a GRU over the behaviour sequence. The history is left-padded
   (most recent last); its valid items are first moved to the front of each row (order kept)
   and the GRU runs on the packed sequence, so padding never enters a state.
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
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from cocorec.data.protocol import FeatureSpec
from cocorec.models.base import BaseModel, Inputs, register
from cocorec.models.din import dnn


class AUGRUCell(nn.Module):
    """GRU with attentional update gate (DIEN eq. 15-16).

    ``u' = a * u``; ``h = (1 - u') * h_prev + u' * h_tilde``, where r, u and h_tilde are the
    usual GRU reset gate, update gate and candidate state. With ``a = 0`` the state is kept.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.x2h = nn.Linear(input_size, 3 * hidden_size)
        self.h2h = nn.Linear(hidden_size, 3 * hidden_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor, att: torch.Tensor,
                x_proj: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, I] (or its projection ``x_proj`` [B, 3H], precomputed), h [B, H], att [B, 1]."""
        gx = self.x2h(x) if x_proj is None else x_proj
        gh = self.h2h(h)
        xr, xu, xn = gx.chunk(3, dim=-1)
        hr, hu, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        u = torch.sigmoid(xu + hu) * att
        n = torch.tanh(xn + r * hn)
        return (1.0 - u) * h + u * n


@register("dien")
class DIEN(BaseModel):
    def __init__(self, spec: FeatureSpec, knowledge_dims: Sequence[int] = (), embedding_dim: int = 16,
                 hidden_units: Sequence[int] = (256, 128, 64), dropout: float = 0.1,
                 dnn_activation: str = "relu", gru_hidden: int | None = None,
                 aux_loss_weight: float = 0.0, aux_hidden_units: Sequence[int] = (100, 50), **kw: Any) -> None:
        super().__init__(spec, knowledge_dims, embedding_dim, **kw)
        di = self.item_dim
        hid = gru_hidden or di
        self.extractor = nn.GRU(di, hid, batch_first=True)
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
        b, t_len, _ = x.hist.shape
        lengths = x.mask.sum(1)                                              # [B]
        # Valid items first, order kept (the history is left-padded: this right-pads it).
        order = torch.argsort((~x.mask).to(torch.int8), dim=1, stable=True)
        valid = torch.arange(t_len, device=x.mask.device).unsqueeze(0) < lengths.unsqueeze(1)  # [B, T]
        seq = x.hist.gather(1, order.unsqueeze(-1).expand_as(x.hist)) * valid.unsqueeze(-1)
        packed = pack_padded_sequence(seq, lengths.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False)
        states, _ = pad_packed_sequence(self.extractor(packed)[0], batch_first=True, total_length=t_len)
        states = states * valid.unsqueeze(-1)                                # [B, T, H]; rows w/o history -> 0

        scores = torch.einsum("bth,bh->bt", states, self.att_w(x.target))
        att = torch.softmax(scores.masked_fill(~valid, torch.finfo(scores.dtype).min), dim=1) * valid  # 0 at padding / empty rows

        proj = self.evolution.x2h(states)                                    # [B, T, 3H], once for all steps
        h = states.new_zeros(b, states.shape[-1])
        for t in range(t_len):
            nxt = self.evolution(states[:, t], h, att[:, t:t + 1], x_proj=proj[:, t])
            h = torch.where(valid[:, t:t + 1], nxt, h)

        self.aux_loss = self._aux_loss(states, seq, valid) if self.aux_net is not None and self.training \
            else states.new_zeros(())
        return h

    def _aux_loss(self, states: torch.Tensor, seq: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        assert self.aux_net is not None
        b = seq.shape[0]
        perm = torch.randperm(b, device=seq.device)
        neg, neg_valid = seq[perm], valid[perm]
        h = states[:, :-1]                                                   # h_t predicts e_{t+1}
        pos_mask = valid[:, 1:]                                              # implies valid[:, :-1]
        pair_mask = pos_mask & neg_valid[:, 1:]
        if not bool(pair_mask.any()):
            return states.new_zeros(())
        pos_logit = self.aux_net(torch.cat([h, seq[:, 1:]], -1)).squeeze(-1)[pair_mask]
        neg_logit = self.aux_net(torch.cat([h, neg[:, 1:]], -1)).squeeze(-1)[pair_mask]
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
