"""The kernels against autograd and direct formulas."""

import pytest
import torch

from lightning_spred.functional import (
    balance,
    factor_gradients,
    group_norms,
    penalty,
    scale_shape,
    sparsity,
    threshold,
)

# (shapes of the tensors, their group dims): elementwise, groups of one weight, and a conv filter sharing its
# channel factor with a bias and a BatchNorm's scale and shift
CASES = {
    "elementwise": ([(4, 5)], [None]),
    "rows": ([(4, 5)], [0]),
    "columns": ([(4, 5)], [1]),
    "coupled": ([(3, 2, 2, 2), (3,), (3,), (3,)], [0, 0, 0, 0]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("buffers", [False, True], ids=["fresh", "reused"])
def test_factor_gradients_match_autograd(case, buffers):
    shapes, dims = CASES[case]
    torch.manual_seed(0)
    us = [torch.randn(shape, requires_grad=True) for shape in shapes]
    v = torch.randn(shapes[0] if dims[0] is None else (shapes[0][dims[0]],), requires_grad=True)
    targets = [torch.randn(shape) for shape in shapes]
    lam = 0.3

    weights = [u * v.reshape(scale_shape(u.shape, dim)) for u, dim in zip(us, dims)]
    for w in weights:
        w.retain_grad()
    loss = sum(((w - t) ** 2 * (i + 1)).sum() for i, (w, t) in enumerate(zip(weights, targets)))
    (loss + lam / 2 * (sum(u.pow(2).sum() for u in us) + v.pow(2).sum())).backward()

    grads = [w.grad.clone() for w in weights]
    out = None
    if buffers:  # the weights' own gradients as grad_u buffers, a scratch for the group sums
        out = (grads, torch.empty_like(v), torch.empty(max(u.numel() for u in us)))
    grad_us, grad_v = factor_gradients(grads, [u.detach() for u in us], v.detach(), dims, lam, out=out)
    for grad_u, u in zip(grad_us, us):
        torch.testing.assert_close(grad_u, u.grad)
    torch.testing.assert_close(grad_v, v.grad)


def test_factor_gradients_without_loss_gradient_is_pure_decay():
    u, v = torch.randn(3, 2), torch.randn(2)
    (grad_u,), grad_v = factor_gradients([None], [u], v, [1], 0.5)
    torch.testing.assert_close(grad_u, 0.5 * u)
    torch.testing.assert_close(grad_v, 0.5 * v)


def test_balance_is_one_at_the_minimum_and_falls_with_imbalance():
    w = torch.tensor([[3.0, -1.0], [4.0, 2.0]])
    v = group_norms(w, 1).sqrt()  # the minimiser of the decay for fixed w: ||u_g|| = v_g = sqrt(||w_g||)
    u = w / v
    torch.testing.assert_close(balance([u], v, [1]), torch.tensor(1.0))
    # u = w, v = 1 (far from balance): the L1 penalty over the factorised one
    norms = group_norms(w, 1)
    torch.testing.assert_close(balance([w], torch.ones(2), [1]), norms.sum() / ((norms.square() + 1).sum() / 2))


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
