"""Contract tests of every CTR backbone (DeepFM, DIN, DIEN, DCNv2, AutoInt, xDeepFM)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from cocorec.data.protocol import FeatureSpec
from cocorec.models import MODELS, BaseModel, build_model, random_batch

NAMES = ["deepfm", "din", "dien", "dcnv2", "autoint", "xdeepfm"]
SEQUENCE_MODELS = ["din", "dien"]
B = 16
# Small networks keep the tests fast; the architecture is the same as with the defaults.
SMALL = {"hidden_units": (32, 16)}

SPEC = FeatureSpec(n_items=40, n_tags=7, max_tags=3, max_hist_len=6,
                   user_fields={"gender": 3, "age": 5}, item_fields={"decade": 4, "lang": 3})


def make(name: str, knowledge_dims=(8, 8), seed: int = 0, **kw) -> BaseModel:
    torch.manual_seed(seed)
    return build_model(name, SPEC, knowledge_dims=list(knowledge_dims), **{**SMALL, **kw})


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    b = random_batch(SPEC, batch_size=B, seed=seed)
    # More left padding than random_batch gives: row 1 has no history at all, row 2 one item.
    T = SPEC.max_hist_len
    for row, n_pad in [(1, T), (2, T - 1), (3, 2)]:
        b["hist_items"][row, :n_pad] = 0
    pad = b["hist_items"] == 0
    b["hist_feats"][pad] = 0
    b["hist_tags"][pad] = 0
    b["hist_ratings"][pad] = 0
    b["hist_mask"] = ~pad
    return b


def knowledge(seed: int = 1, dims=(8, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, k, generator=g) for k in dims]


def test_all_backbones_registered():
    assert sorted(MODELS) == sorted(NAMES)
    with pytest.raises(ValueError):
        build_model("nope", SPEC)


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_finite(name):
    model = make(name)
    out = model(batch(), knowledge())
    assert out.shape == (B,)
    assert torch.isfinite(out).all()
    model.eval()
    out = model(batch(), knowledge())
    assert out.shape == (B,) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_default_config_builds_and_runs(name):
    torch.manual_seed(0)
    model = build_model(name, SPEC, knowledge_dims=[8, 8])
    out = model(batch(), knowledge())
    assert out.shape == (B,) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name):
    model = make(name)
    model.train()
    torch.manual_seed(0)
    b = batch()
    loss = F.binary_cross_entropy_with_logits(model(b, knowledge()), b["label"])
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"{name}: parameters without gradient: {missing}"


def test_dien_aux_loss():
    model = make("dien", aux_loss_weight=0.5)
    model.train()
    torch.manual_seed(0)
    b = batch()
    logits = model(b, knowledge())
    aux = model.aux_loss
    assert aux.dim() == 0 and torch.isfinite(aux) and aux.item() > 0
    (F.binary_cross_entropy_with_logits(logits, b["label"]) + aux).backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"dien with aux loss: parameters without gradient: {missing}"
    copy.deepcopy(model)            # the stored aux loss (with its graph) must not break copies
    model.eval()
    model(b, knowledge())
    assert model.aux_loss.item() == 0.0
    # Off by default: a zero scalar that is safe to add.
    plain = make("dien").train()
    plain(b, knowledge())
    assert plain.aux_loss.dim() == 0 and plain.aux_loss.item() == 0.0
    assert plain.aux_net is None


@pytest.mark.parametrize("name", NAMES)
def test_knowledge_fields_matter(name):
    model = make(name).eval()
    b = batch()
    with torch.no_grad():
        with_k = model(b, knowledge())
        zeros = model(b, [torch.zeros(B, 8), torch.zeros(B, 8)])
        none = model(b, None)
    assert not torch.allclose(with_k, zeros), f"{name}: knowledge does not change the output"
    assert_close(none, zeros)
    with pytest.raises(ValueError):
        model(b, knowledge(dims=(8,)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dims", [(), (5,), (4, 6, 3)])
def test_any_number_of_knowledge_fields(name, dims):
    model = make(name, knowledge_dims=dims)
    out = model(batch(), knowledge(dims=dims) if dims else None)
    assert out.shape == (B,) and torch.isfinite(out).all()
    out.sum().backward()


def _scramble_padding(b: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Put random content at the padded history positions, keeping hist_mask as it was."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in b.items()}
    pad = ~b["hist_mask"]
    n = int(pad.sum())
    assert n > 0
    out["hist_items"][pad] = torch.randint(1, SPEC.n_items, (n,), generator=g)
    out["hist_ratings"][pad] = torch.randint(1, SPEC.n_ratings, (n,), generator=g)
    out["hist_feats"][pad] = torch.stack([torch.randint(1, k, (n,), generator=g)
                                          for k in SPEC.item_fields.values()], -1)
    out["hist_tags"][pad] = torch.randint(1, SPEC.n_tags, (n, SPEC.max_tags), generator=g)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_padded_history_content_is_ignored(name):
    model = make(name)
    b = batch()
    scrambled = _scramble_padding(b, seed=3)
    k = knowledge()
    # The scrambled content does reach the embeddings (so the check below is not vacuous) ...
    with torch.no_grad():
        hist, hist2 = model.embed(b, k).hist, model.embed(scrambled, k).hist
    pad = ~b["hist_mask"]
    assert not torch.allclose(hist[pad], hist2[pad])
    assert_close(hist[~pad], hist2[~pad])
    # ... but not the output, in eval mode and in training mode (same dropout masks / aux negatives).
    model.eval()
    with torch.no_grad():
        assert_close(model(b, k), model(scrambled, k))
    model.train()
    outs = []
    for bb in (b, scrambled):
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(model(bb, k))
    assert_close(outs[0], outs[1])


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_sequence_models_use_the_history(name):
    model = make(name).eval()
    b = batch()
    other = dict(b)
    other["hist_ratings"] = torch.where(b["hist_mask"], 6 - b["hist_ratings"].clamp_min(1), 0)
    with torch.no_grad():
        assert not torch.allclose(model(b, knowledge()), model(other, knowledge()))


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic(name):
    model = make(name)
    model.train()
    model(batch(), knowledge())          # some running statistics (Dice) get updated
    model.eval()
    b, k = batch(), knowledge()
    with torch.no_grad():
        first = model(b, k)
        torch.manual_seed(123)
        second = model(b, k)
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", NAMES)
def test_overfits_a_tiny_batch(name):
    # No knowledge: the model has to fit the batch through its embeddings and interactions.
    model = make(name, knowledge_dims=(), seed=1)
    b, k = batch(seed=5), None
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(b, k), b["label"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = F.binary_cross_entropy_with_logits(model(b, k), b["label"]).item()
    assert losses[0] > 0.6
    assert final < 0.5 * losses[0], f"{name}: loss {losses[0]:.3f} -> {final:.3f}"


def _row(x, i: int):
    """Row i of embedded inputs with its padding removed (a batch of one, no masked position)."""
    m = x.mask[i]
    return type(x)(target=x.target[i:i + 1], hist=x.hist[i:i + 1, m], mask=x.mask[i:i + 1, m],
                   user=x.user[i:i + 1], knowledge=x.knowledge[i:i + 1], d=x.d)


def test_din_interest_matches_a_per_row_reference():
    model = make("din").eval()
    with torch.no_grad():
        x = model.embed(batch(), knowledge())
        pooled = model.interest(x)
        for i in range(B):
            r = _row(x, i)
            t = r.target.expand_as(r.hist[0])
            mlp = torch.nn.Sequential.forward   # the unit's MLP itself, on [t, h, t - h, t * h]
            w = mlp(model.attention, torch.cat([t, r.hist[0], t - r.hist[0], t * r.hist[0]], -1))  # [L, 1], no softmax
            assert_close(pooled[i], (w * r.hist[0]).sum(0), atol=1e-6, rtol=1e-5)
    assert torch.equal(pooled[1], torch.zeros_like(pooled[1]))        # row without history


@pytest.mark.parametrize("name", NAMES)
def test_for_inference_with_an_item_table_gives_the_same_logits(name):
    """A batch whose item features are rows of the tables (as a bundle builds it): the copy that looks item
    vectors up gives the model's logits, padding included; the model itself gets no table."""
    model = make(name).eval()
    g = torch.Generator().manual_seed(3)
    feats = torch.stack([torch.randint(1, n, (SPEC.n_items,), generator=g) for n in SPEC.item_fields.values()], -1)
    tags = torch.randint(0, SPEC.n_tags, (SPEC.n_items, SPEC.max_tags), generator=g)   # 0: an empty tag slot
    feats[0], tags[0] = 0, 0
    b = batch()
    b.update(item_feats=feats[b["item"]], item_tags=tags[b["item"]], hist_feats=feats[b["hist_items"]],
             hist_tags=tags[b["hist_items"]])
    fast = model.for_inference(feats, tags)
    with torch.no_grad():
        assert_close(fast(b, knowledge()), model(b, knowledge()), atol=1e-5, rtol=1e-5)
    assert "item_table" in dict(fast.named_buffers()) and "item_table" not in dict(model.named_buffers())


@pytest.mark.parametrize("act,hidden", [("dice", (64,)), ("dice", (32, 16)), ("prelu", (64,)), ("relu", (8,))])
def test_din_for_inference_gives_the_same_logits_as_the_model(act, hidden):
    """The folded unit (serving) gives the trained model's logits, padded rows and a row with no history
    included, with Dice's running statistics moved off their initial values; the model itself is untouched."""
    model = make("din", attention_activation=act, attention_hidden_units=hidden)
    model.train()
    for seed in range(3):   # Dice's running mean / variance away from 0 / 1
        model(batch(seed), knowledge(seed + 1))
    model.eval()
    keys = set(model.state_dict())
    fast = model.for_inference()
    with torch.no_grad():
        assert_close(fast(batch(), knowledge()), model(batch(), knowledge()), atol=1e-5, rtol=1e-5)
    assert type(fast.attention).__name__ == "FoldedActivationUnit" and set(model.state_dict()) == keys


def test_dien_matches_a_per_row_reference():
    """Batched DIEN (masked GRU and AUGRU over the left-padded history) == each row alone, unpadded."""
    model = make("dien").eval()
    with torch.no_grad():
        x = model.embed(batch(), knowledge())
        full = model.evolved_interest(x)
        for i in range(B):
            r = _row(x, i)
            if r.hist.shape[1] == 0:
                assert torch.equal(full[i], torch.zeros_like(full[i]))
                continue
            h, states = r.hist.new_zeros(1, model.extractor.hidden_size), []
            for t in range(r.hist.shape[1]):
                h = model.extractor(r.hist[:, t], h)
                states.append(h)
            states = torch.stack(states, 1)                                           # [1, L, H]
            att = torch.softmax(torch.einsum("bth,bh->bt", states, model.att_w(r.target)), dim=1)
            h = states.new_zeros(1, states.shape[-1])
            for t in range(states.shape[1]):
                h = model.evolution(states[:, t], h, att[:, t:t + 1])
            assert_close(full[i], h[0], atol=1e-6, rtol=1e-5)
