"""Small tensor kernels behind spred: factor gradients, penalties, sparsity counts.

Every function here is pure (no module state) so it can be tested against a direct formula and used
outside the callback.

The factorisation is ``w = u * v`` where ``u`` has the weight's shape and ``v`` broadcasts to it.
When ``v`` has the weight's shape the penalty is the plain L1 norm; when ``v`` holds one entry per
index of a dimension (shape ``1`` everywhere else) the penalty is the group lasso over that dimension.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "count_zeros",
    "factor_gradients",
    "group_norms",
    "penalty",
    "scale_shape",
    "sparsity",
    "threshold",
]


def scale_shape(weight_shape: torch.Size, dim: Optional[int]) -> torch.Size:
    """Shape of the factor ``v`` for a weight of ``weight_shape``.

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
    weight_grad: Optional[Tensor], u: Tensor, v: Tensor, lam: float, out: Optional[tuple[Tensor, Tensor]] = None
) -> tuple[Tensor, Tensor]:
    """Gradients of ``loss(u * v) + lam / 2 * (|u|^2 + |v|^2)`` with respect to ``u`` and ``v``.

    Args:
        weight_grad: gradient of the loss with respect to ``w = u * v`` (``None`` means zero).
        u: factor with the weight's shape.
        v: factor that broadcasts to the weight's shape.
        lam: the L1 coefficient.
        out: optional buffers shaped like ``u`` and ``v`` to write into. Reusing them matters on the CPU,
            where a fresh weight-sized allocation costs more than the arithmetic. When ``v`` has ``u``'s shape,
            ``grad_u``'s buffer may be ``weight_grad`` itself, which is then overwritten.

    Returns:
        ``(grad_u, grad_v)`` with the shapes of ``u`` and ``v``.

    Example:
        >>> u, v = torch.tensor([2.0]), torch.tensor([3.0])
        >>> factor_gradients(torch.tensor([1.0]), u, v, lam=0.5)
        (tensor([4.]), tensor([3.5000]))
    """
    grad_u, grad_v = out if out is not None else (torch.empty_like(u), torch.empty_like(v))
    if weight_grad is None:
        return torch.mul(u, lam, out=grad_u), torch.mul(v, lam, out=grad_v)
    if v.shape == u.shape:
        torch.mul(weight_grad, u, out=grad_v)
    else:  # a shared factor per group: its gradient sums over the group (grad_u is the scratch space)
        torch.mul(weight_grad, u, out=grad_u)
        dims = [d for d, size in enumerate(v.shape) if size == 1 and u.shape[d] != 1]
        torch.sum(grad_u, dim=dims, keepdim=True, out=grad_v)
    grad_v.add_(v, alpha=lam)
    torch.mul(weight_grad, v, out=grad_u)
    grad_u.add_(u, alpha=lam)
    return grad_u, grad_v


def group_norms(weight: Tensor, dim: Optional[int]) -> Tensor:
    """Euclidean norm of each group of ``weight`` (absolute values when ``dim`` is ``None``).

    Example:
        >>> group_norms(torch.tensor([[3.0, 0.0], [4.0, 0.0]]), dim=1)
        tensor([5., 0.])
    """
    if dim is None:
        return weight.abs()
    other = [d for d in range(weight.ndim) if d != dim]
    return torch.linalg.vector_norm(weight, dim=other)


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
