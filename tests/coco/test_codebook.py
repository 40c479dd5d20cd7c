"""VQ codebook: nearest-key selection, the VQ loss and its gradients, dead-code reset, perplexity."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from cocorec.coco.codebook import VQCodebook, perplexity


def _codebook(**kw) -> VQCodebook:
    torch.manual_seed(0)
    cb = VQCodebook(num_codes=3, key_dim=2, prompt_len=2, hidden_size=4, **kw)
    with torch.no_grad():
        cb.keys.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    return cb


def test_selects_nearest_key_and_loss_matches_formula():
    cb = _codebook()
    q = torch.tensor([[9.0, 1.0], [0.5, 0.0], [1.0, 8.0]], requires_grad=True)
    out = cb(q)
    assert out.codes.tolist() == [1, 0, 2]
    c = cb.keys.detach()[out.codes]
    expected = ((c - q.detach()) ** 2).sum(-1).mean() * (1 + 0.25)   # same value, different gradients
    assert_close(out.loss, expected)
    assert_close(out.prompts.detach(), cb.prompts.detach()[out.codes])  # U = 0 at start: exact prompts


def test_gradients_reach_keys_prompts_and_query():
    cb = _codebook()
    with torch.no_grad():
        cb.st_proj.weight.normal_()          # as after some training: the straight-through path is live
    q = torch.tensor([[9.0, 1.0], [0.5, 0.0]], requires_grad=True)
    out = cb(q)
    # The task gradient alone (no VQ loss) reaches the query through the straight-through estimator.
    (g_q,) = torch.autograd.grad(out.prompts.pow(2).sum(), q, retain_graph=True)
    assert g_q.abs().sum() > 0
    (out.loss + out.prompts.pow(2).sum()).backward()
    assert cb.keys.grad[[0, 1]].abs().sum() > 0 and cb.keys.grad[2].abs().sum() == 0  # only picked keys
    assert cb.prompts.grad[[0, 1]].abs().sum() > 0 and cb.prompts.grad[2].abs().sum() == 0
    assert q.grad.abs().sum() > 0
    # Commitment: the VQ loss pulls the query toward its key with weight beta.
    q2 = q.detach().clone().requires_grad_(True)
    cb(q2).loss.backward()
    c = cb.keys.detach()[[1, 0]]
    assert_close(q2.grad, 0.25 * 2 * (q2.detach() - c) / 2)


def test_dead_code_reset_revives_an_unused_code():
    cb = _codebook()
    cb.train()
    q = torch.randn(64, 2) * 0.5 + torch.tensor([10.0, 0.0])   # every query near key 1
    assert set(cb(q).codes.tolist()) == {1}
    n = cb.reset_dead_codes(generator=torch.Generator().manual_seed(0))
    assert n == 2 and int(cb.n_resets) == 2
    codes = cb(q).codes
    assert len(set(codes.tolist())) > 1      # the revived keys now win some of the queries
    assert perplexity(torch.bincount(codes, minlength=3)) > 1.0


def test_prompts_start_from_real_token_embeddings():
    cb = _codebook()
    emb = torch.randn(50, 4)
    ids = cb.init_prompts_from_embeddings(emb, generator=torch.Generator().manual_seed(1))
    assert ids.shape == (3, 2) and len(set(ids.flatten().tolist())) == 6
    assert_close(cb.prompts.detach(), emb[ids])


def test_perplexity_bounds():
    assert perplexity(torch.tensor([3.0, 3.0, 3.0, 3.0])) == 4.0
    assert perplexity(torch.tensor([0.0, 7.0, 0.0])) == 1.0
