"""KAR's hybrid-expert adaptor: shapes, gates, shared vs specific experts."""

from __future__ import annotations

import pytest
import torch

from cocorec.knowledge.hea import HybridExpertAdaptor, expert_mlp


def test_output_shapes_and_gates_sum_to_one():
    torch.manual_seed(0)
    hea = HybridExpertAdaptor(in_dim=48, n_types=2, n_shared=2, n_specific=3, hidden=(128, 32))
    x = [torch.randn(7, 48), torch.randn(7, 48)]
    outs, gates = hea(x, return_gates=True)
    assert [tuple(o.shape) for o in outs] == [(7, 32), (7, 32)]
    assert hea.out_dims == [32, 32]
    for g in gates:
        assert g.shape == (7, 5)
        assert torch.all(g >= 0)
        torch.testing.assert_close(g.sum(-1), torch.ones(7))
    # without return_gates: just the outputs
    assert len(hea(x)) == 2


def test_output_is_the_gate_weighted_mix_of_experts():
    torch.manual_seed(1)
    hea = HybridExpertAdaptor(in_dim=8, n_types=2, n_shared=1, n_specific=2, hidden=(16, 4))
    x = [torch.randn(3, 8), torch.randn(3, 8)]
    outs, gates = hea(x, return_gates=True)
    for t in range(2):
        experts = [hea.shared[0](x[t])] + [e(x[t]) for e in hea.specific[t]]
        manual = sum(gates[t][:, k:k + 1] * experts[k] for k in range(3))
        torch.testing.assert_close(outs[t], manual)


def test_shared_experts_get_gradient_from_both_types_specific_only_from_their_own():
    torch.manual_seed(2)
    hea = HybridExpertAdaptor(in_dim=8, n_types=2, n_shared=1, n_specific=1, hidden=(16, 4))
    outs = hea([torch.randn(4, 8), torch.randn(4, 8)])
    outs[0].sum().backward()  # only the first type's output
    assert hea.shared[0][0].weight.grad.abs().sum() > 0
    assert hea.specific[0][0][0].weight.grad.abs().sum() > 0
    assert hea.specific[1][0][0].weight.grad is None
    assert hea.gates[1].weight.grad is None


def test_only_shared_or_only_specific_experts_and_errors():
    assert HybridExpertAdaptor(8, n_shared=0, n_specific=2, hidden=(4,))([torch.randn(2, 8)] * 2)[0].shape == (2, 4)
    assert HybridExpertAdaptor(8, n_shared=3, n_specific=0, hidden=(4,))([torch.randn(2, 8)] * 2)[1].shape == (2, 4)
    with pytest.raises(ValueError):
        HybridExpertAdaptor(8, n_shared=0, n_specific=0)
    hea = HybridExpertAdaptor(8, n_types=2, hidden=(4,))
    with pytest.raises(ValueError, match="expected 2 inputs"):
        hea([torch.randn(2, 8)])
    with pytest.raises(ValueError, match="width"):
        hea([torch.randn(2, 8), torch.randn(2, 9)])


def test_expert_mlp_layers():
    m = expert_mlp(10, (128, 32))
    assert [type(x).__name__ for x in m] == ["Linear", "ReLU", "Linear"]
    assert m(torch.randn(2, 10)).shape == (2, 32)
