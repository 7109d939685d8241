"""The kernels against autograd and direct formulas."""

import pytest
import torch

from lightning_spred.functional import factor_gradients, group_norms, penalty, scale_shape, sparsity, threshold


@pytest.mark.parametrize("dim", [None, 0, 1])
def test_factor_gradients_match_autograd(dim):
    torch.manual_seed(0)
    target = torch.randn(4, 5)
    u = torch.randn(4, 5, requires_grad=True)
    v = torch.randn(scale_shape(u.shape, dim), requires_grad=True)
    lam = 0.3

    weight = u * v
    weight.retain_grad()
    loss = ((weight - target) ** 2).sum()
    (loss + lam / 2 * (u.pow(2).sum() + v.pow(2).sum())).backward()

    grad_u, grad_v = factor_gradients(weight.grad, u.detach(), v.detach(), lam)
    torch.testing.assert_close(grad_u, u.grad)
    torch.testing.assert_close(grad_v, v.grad)


def test_factor_gradients_without_loss_gradient_is_pure_decay():
    u, v = torch.randn(3, 2), torch.randn(1, 2)
    grad_u, grad_v = factor_gradients(None, u, v, 0.5)
    torch.testing.assert_close(grad_u, 0.5 * u)
    torch.testing.assert_close(grad_v, 0.5 * v)


def test_minimum_of_the_decay_over_factorisations_is_the_penalty():
    # min over u * v = w of (|u|^2 + |v|^2) / 2 is |w| (elementwise) and ||w_g|| (a shared factor per group).
    w = torch.tensor([[3.0, -1.0, 0.0], [4.0, 2.0, 0.0]])
    for dim in (None, 1, 0):
        norms = group_norms(w, dim)
        scale = norms.clamp_min(1e-30).sqrt()
        v = scale if dim is None else scale.reshape(scale_shape(w.shape, dim))
        u = torch.where(v == 0, torch.zeros_like(w), w / v.clamp_min(1e-30))
        torch.testing.assert_close(u * v, w)
        decay = (u.pow(2).sum() + v.pow(2).sum()) / 2
        torch.testing.assert_close(decay, penalty(w, 1.0, dim), atol=1e-6, rtol=1e-6)


def test_group_norms_and_penalty_direct():
    w = torch.tensor([[3.0, -1.0], [4.0, 0.0]])
    torch.testing.assert_close(group_norms(w, 1), torch.tensor([5.0, 1.0]))
    torch.testing.assert_close(group_norms(w, 0), torch.tensor([10.0**0.5, 4.0]))
    torch.testing.assert_close(penalty(w, 0.5), torch.tensor(4.0))


def test_threshold_and_sparsity():
    w = torch.tensor([1e-8, -1e-6, 2e-6, -3.0], dtype=torch.float64)
    out = threshold(w, 1e-6)
    assert out.tolist() == [0.0, 0.0, 2e-6, -3.0]
    assert w.tolist()[0] == 1e-8  # the input is not modified
    assert sparsity(w, 1e-6).item() == 0.5
    assert sparsity(torch.zeros(0)).item() == 0.0
