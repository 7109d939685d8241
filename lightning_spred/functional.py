"""Small tensor kernels behind spred: factor gradients, penalties, thresholds, sparsity counts.

Every function here is pure (no module state) so it can be tested against a direct formula and used
outside the callback.

A penalised group of tensors ``w_1, ..., w_n`` is factorised as ``w_i = u_i * v`` where ``u_i`` has
``w_i``'s shape and ``v`` is shared:

- elementwise L1 (one tensor, ``dim=None``): ``v`` has the weight's shape; the penalty is ``sum |w|``;
- group lasso along ``dim``: ``v`` holds one entry per index of ``dim`` (shape ``(C,)``) and is broadcast
  along the other dimensions of every tensor; the penalty is ``sum_c ||(w_1[c], ..., w_n[c])||_2``.
  Several tensors share one ``v`` when their groups are the same units (a conv filter, its bias and
  the scale and shift of the BatchNorm after it).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "balance",
    "count_zeros",
    "factor_gradients",
    "forecast_exits",
    "group_norms",
    "joint_group_norms",
    "penalty",
    "scale_shape",
    "sparsity",
    "threshold",
]


def scale_shape(weight_shape: torch.Size, dim: Optional[int]) -> torch.Size:
    """Shape in which the shared factor ``v`` broadcasts against a weight of ``weight_shape``.

    Args:
        weight_shape: shape of the penalised weight.
        dim: ``None`` for elementwise L1; otherwise the dimension whose indices form the groups
            (``1`` for the input columns of a ``Linear``, ``0`` for output rows or conv channels).

    Example:
        >>> scale_shape(torch.Size([3, 5]), dim=1)
        torch.Size([1, 5])
        >>> scale_shape(torch.Size([3, 5]), dim=None)
        torch.Size([3, 5])
    """
    if dim is None:
        return weight_shape
    shape = [1] * len(weight_shape)
    shape[dim] = weight_shape[dim]
    return torch.Size(shape)


def factor_gradients(
    weight_grads: Sequence[Optional[Tensor]],
    us: Sequence[Tensor],
    v: Tensor,
    dims: Sequence[Optional[int]],
    lam: float,
    out: Optional[tuple[Sequence[Optional[Tensor]], Tensor, Optional[Tensor]]] = None,
) -> tuple[list[Tensor], Tensor]:
    """Gradients of ``loss(u_1 * v, ..., u_n * v) + lam / 2 * (sum_i |u_i|^2 + |v|^2)``.

    Args:
        weight_grads: gradient of the loss with respect to each ``w_i = u_i * v`` (``None`` means zero).
        us: the factors ``u_i``, each with its weight's shape.
        v: the shared factor: the weight's shape when ``dims == [None]``, else ``(C,)``.
        dims: for each tensor, ``None`` (elementwise, a single tensor) or the dimension of its groups.
        lam: the L1 coefficient.
        out: optional buffers ``(grad_us, grad_v, scratch)`` to write into: reusing them matters on the CPU,
            where a fresh weight-sized allocation costs more than the arithmetic. A ``grad_us`` entry may be
            the weight's own gradient, which is then overwritten; ``scratch`` (the largest grouped weight's
            size) is needed for groups only.

    Returns:
        ``(grad_us, grad_v)``: one gradient per ``u_i``, and the gradient of ``v``.

    Example:
        >>> u, v = torch.tensor([2.0]), torch.tensor([3.0])
        >>> factor_gradients([torch.tensor([1.0])], [u], v, [None], lam=0.5)
        ([tensor([4.])], tensor([3.5000]))
    """
    grad_u_buffers, grad_v, scratch = out if out is not None else ([None] * len(us), torch.empty_like(v), None)
    grad_us: list[Tensor] = []
    written = False  # the first contribution is written into grad_v, the others are added
    for grad, u, dim, buffer in zip(weight_grads, us, dims, grad_u_buffers):
        v_view = v.reshape(scale_shape(u.shape, dim))
        target = grad_v.view(v_view.shape)
        buffer = torch.empty_like(u) if buffer is None else buffer
        if grad is None:  # this tensor took no part in the loss: the decay alone
            grad_us.append(torch.mul(u, lam, out=buffer))
            continue
        if dim is None:  # elementwise: a single tensor, so nothing to add to
            torch.mul(grad, u, out=target)
        elif u.ndim == 1:  # one entry per group (a bias, a normalisation's scale): nothing to sum
            if written:
                target.addcmul_(grad, u)
            else:
                torch.mul(grad, u, out=target)
        else:
            part = torch.mul(grad, u, out=None if scratch is None else scratch.view(-1)[: u.numel()].view_as(u))
            reduce = [d for d in range(u.ndim) if d != dim]
            if written:
                target.add_(part.sum(dim=reduce, keepdim=True))
            else:
                torch.sum(part, dim=reduce, keepdim=True, out=target)
        written = True
        grad_us.append(torch.mul(grad, v_view, out=buffer).add_(u, alpha=lam))
    if not written:
        grad_v.zero_()
    grad_v.add_(v, alpha=lam)
    return grad_us, grad_v


def group_norms(weight: Tensor, dim: Optional[int]) -> Tensor:
    """Euclidean norm of each group of ``weight`` (absolute values when ``dim`` is ``None``).

    Example:
        >>> group_norms(torch.tensor([[3.0, 0.0], [4.0, 0.0]]), dim=1)
        tensor([5., 0.])
    """
    if dim is None:
        return weight.abs()
    other = [d for d in range(weight.ndim) if d != dim]
    # square-sum-sqrt: on the CPU, vector_norm over a leading dimension is ~10x slower (a 32 x 6830 weight's columns)
    return weight.square().sum(dim=other).sqrt() if other else weight.abs()


def joint_group_norms(tensors: Sequence[Tensor], dims: Sequence[Optional[int]]) -> Tensor:
    """Euclidean norm of each group across several tensors that share the groups (a channel: its filter, bias and
    BatchNorm scale and shift), shaped like the first tensor's :func:`group_norms`.

    Example:
        >>> joint_group_norms([torch.tensor([[3.0], [0.0]]), torch.tensor([4.0, 1.0])], dims=[0, 0])
        tensor([5., 1.])
    """
    first = group_norms(tensors[0], dims[0])
    if len(tensors) == 1:
        return first
    squares = sum(group_norms(t, dim).reshape(first.shape).square() for t, dim in zip(tensors[1:], dims[1:]))
    return (first.square() + squares).sqrt()


def penalty(weight: Tensor, lam: float, dim: Optional[int] = None) -> Tensor:
    """The penalty spred minimises: ``lam * sum|w|``, or ``lam * sum_g ||w_g||_2`` for groups along ``dim``.

    Example:
        >>> penalty(torch.tensor([[3.0, -1.0], [4.0, 0.0]]), lam=0.1)
        tensor(0.8000)
        >>> penalty(torch.tensor([[3.0, -1.0], [4.0, 0.0]]), lam=0.1, dim=1)
        tensor(0.6000)
    """
    return lam * group_norms(weight, dim).sum()


def threshold(weight: Tensor, value: float, dim: Optional[int] = None) -> Tensor:
    """A copy of ``weight`` with small entries, or small groups, set to exactly zero.

    Args:
        weight: the weight.
        value: entries (``dim=None``) or groups along ``dim`` whose magnitude (Euclidean norm) is ``<= value``
            become zero. A group is zeroed whole or kept whole: the group lasso does not zero single entries.
        dim: ``None`` for entries, else the dimension whose indices are the groups.

    Example:
        >>> threshold(torch.tensor([1e-9, -0.5, 2e-7]), 1e-6)
        tensor([ 0.0000, -0.5000,  0.0000])
        >>> threshold(torch.tensor([[1e-9, 0.5], [1e-9, 1e-9]]), 1e-6, dim=1)
        tensor([[0.0000e+00, 5.0000e-01],
                [0.0000e+00, 1.0000e-09]])
    """
    norms = group_norms(weight, dim)
    if dim is not None:
        norms = norms.reshape(scale_shape(weight.shape, dim))
    return torch.where(norms <= value, torch.zeros_like(weight), weight)


def count_zeros(weight: Tensor, value: float = 0.0) -> Tensor:
    """Number of entries of ``weight`` with magnitude ``<= value``: the one definition of "zero" used everywhere.

    Example:
        >>> count_zeros(torch.tensor([0.0, 1e-9, 0.3, -2.0]), 1e-6)
        tensor(2)
    """
    return (weight.detach().abs() <= value).sum()


def sparsity(weight: Tensor, value: float = 0.0) -> Tensor:
    """Fraction of entries of ``weight`` with magnitude ``<= value``, a number in ``[0, 1]``.

    Example:
        >>> sparsity(torch.tensor([0.0, 1e-9, 0.3, -2.0]), 1e-6)
        tensor(0.5000)
    """
    if weight.numel() == 0:
        return torch.zeros((), device=weight.device)
    return count_zeros(weight, value) / weight.numel()


def balance(us: Sequence[Tensor], v: Tensor, dims: Sequence[Optional[int]]) -> Tensor:
    """How much of the factors' decay acts as the L1 penalty: ``sum_g ||w_g|| / sum_g (||u_g||^2 + v_g^2) / 2``.

    ``(||u_g||^2 + v_g^2) / 2 >= ||u_g|| |v_g| = ||w_g||``, with equality when the factors are balanced: ``1.0``
    means spred acts exactly as the L1 (group) penalty, values towards ``0.0`` that it still acts like L2 weight
    decay (far from balance, for example ``u = w, v = 1`` with small weights). Groups weigh by their size, so
    groups on their way to zero do not count.

    Example:
        >>> balance([torch.tensor([2.0, 0.1])], torch.tensor([2.0, 1.0]), [None])
        tensor(0.9101)
    """
    a = joint_group_norms(us, dims).reshape(v.shape).square()
    b = v.square()
    total = (a + b).sum()
    # no `if total == 0`: a tensor's truth value waits for the device
    return torch.where(total > 0, (2 * (a * b).sqrt()).sum() / total.clamp_min(1e-30), torch.ones_like(total))


def forecast_exits(previous: Optional[Tensor], now: Tensor, every: int, horizon: int, threshold: float) -> Tensor:
    """How many of the nonzero magnitudes ``now`` reach ``threshold`` within ``horizon`` steps at their rate of change
    since ``previous`` (the same magnitudes ``every`` steps earlier): a switched-off weight decays exponentially, so a
    count of zeros lags ``lam`` and a forecast of exits leads it. Without ``previous``: those at the threshold now.

    Example:
        >>> forecast_exits(torch.tensor([1.0, 1.0]), torch.tensor([0.5, 1.0]), every=1, horizon=3, threshold=0.1)
        tensor(1)
    """
    alive = now != 0
    if previous is None or previous.shape != now.shape:
        return (alive & (now <= threshold)).sum()
    log_now = now.clamp_min(1e-30).log()
    rate = (log_now - previous.clamp_min(1e-30).log()) / every
    return (alive & (log_now + rate.clamp_max(0) * horizon <= math.log(max(threshold, 1e-30)))).sum()
