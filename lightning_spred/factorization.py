"""Rewrite one weight as ``w = u * v`` in place, and merge it back to a plain weight.

Design: the module keeps its own ``nn.Parameter`` ``w`` under its own name (same object, so ties and
references survive) and the forward pass uses it unchanged. The factors ``u`` and ``v`` are registered
beside it on the same module (so ``configure_optimizers`` and ``.to(device)`` see them) but take no
part in the forward pass. The gradient reaching ``w`` is turned into factor gradients just before
the optimizer steps (:func:`lightning_spred.functional.factor_gradients`) and ``w`` is refreshed to
``u * v`` just after. So autograd and DDP only ever see ``w``: DDP all-reduces ``w.grad`` and nothing
else, and the forward and backward passes cost what the plain model costs.

State-dict hooks keep every checkpoint in the plain model's format: the factor entries are dropped
and ``w`` is written with small entries set to exact zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_spred.functional import factor_gradients, scale_shape, threshold

__all__ = ["Factorization", "factorize", "merge"]

_U_SUFFIX = "__spred_u"
_V_SUFFIX = "__spred_v"


@dataclass
class Factorization:
    """One penalised weight ``w = u * v`` living on ``module`` under ``name``.

    Attributes:
        module: the module that owns the weight.
        name: the weight's attribute name on ``module`` (for example ``"weight"``).
        path: the weight's name in the whole model (for example ``"encoder.0.weight"``).
        lam: L1 coefficient for this weight.
        dim: ``None`` for elementwise L1, else the dimension whose indices are the groups.
        threshold: magnitude at or below which entries count as zero in checkpoints and at merge.
    """

    module: nn.Module
    name: str
    path: str
    lam: float
    dim: Optional[int]
    threshold: float
    _handles: list[RemovableHandle] = field(default_factory=list, repr=False)
    _grad_buffers: Optional[tuple[Optional[Tensor], Tensor]] = field(default=None, repr=False)

    @property
    def weight(self) -> nn.Parameter:
        return self.module._parameters[self.name]  # type: ignore[return-value]

    @property
    def u(self) -> nn.Parameter:
        return self.module._parameters[self.name + _U_SUFFIX]  # type: ignore[return-value]

    @property
    def v(self) -> nn.Parameter:
        return self.module._parameters[self.name + _V_SUFFIX]  # type: ignore[return-value]

    @property
    def factor_paths(self) -> tuple[str, str]:
        """Names of ``u`` and ``v`` in the whole model, as DDP and ``named_parameters`` see them."""
        return self.path + _U_SUFFIX, self.path + _V_SUFFIX

    @torch.no_grad()
    def set_factors(self, u: Tensor, v: Tensor) -> None:
        """Copy ``u`` and ``v`` into the factors and refresh ``w``."""
        self.u.copy_(u)
        self.v.copy_(v)
        self.refresh_weight()

    @torch.no_grad()
    def reset_factors(self) -> None:
        """Restart from the current weight: ``u = w``, ``v = 1``, which leaves the model's function unchanged.

        Never the balanced split ``sign(w) sqrt|w|, sqrt|w|``: under gradient flow ``u^2 - v^2`` only
        decays, so a balanced start can never change the sign of a weight and converges to wrong minima.
        """
        self.u.copy_(self.weight)
        self.v.fill_(1.0)

    @torch.no_grad()
    def refresh_weight(self) -> None:
        torch.mul(self.u, self.v, out=self.weight)

    def accumulate_factor_gradients(self) -> None:
        """Turn ``w.grad`` into the gradients of ``u`` and ``v`` (with the decay) and clear ``w.grad``."""
        weight, u, v = self.weight, self.u, self.v
        grad = weight.grad
        if grad is None:  # the weight took no part in the loss: the decay alone
            u.grad, v.grad = factor_gradients(None, u.detach(), v.detach(), self.lam)
            return
        if self._grad_buffers is None or self._grad_buffers[1].device != u.device:
            # Persistent buffers: a fresh weight-sized allocation page-faults on the CPU at every step.
            # Elementwise, w.grad (dropped below) holds grad_u; groups need a weight-sized scratch.
            self._grad_buffers = (torch.empty_like(u) if v.shape != u.shape else None, torch.empty_like(v))
        grad_u, grad_v = self._grad_buffers
        out = (grad if grad_u is None else grad_u, grad_v)
        u.grad, v.grad = factor_gradients(grad, u.detach(), v.detach(), self.lam, out=out)
        weight.grad = None

    def sparse_weight(self, value: Optional[float] = None) -> Tensor:
        """``u * v`` with entries (or, for groups, whole groups) of magnitude ``<= value`` set to exact zero.

        ``value`` defaults to ``self.threshold``.
        """
        with torch.no_grad():
            return threshold(self.u * self.v, self.threshold if value is None else value, self.dim)


def factorize(
    module: nn.Module, name: str, path: str, lam: float, dim: Optional[int] = None, threshold: float = 0.0
) -> Factorization:
    """Add factors ``u = w``, ``v = 1`` beside ``module.<name>``; the model's function is unchanged.

    Args:
        module: the module owning the weight.
        name: attribute name of the weight on ``module``.
        path: the weight's name in the whole model (used in errors and reports).
        lam: L1 coefficient.
        dim: ``None`` for elementwise L1, or the dimension whose indices form the groups.
        threshold: entries at or below this magnitude are written as exact zeros in checkpoints.

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> f = factorize(layer, "weight", "weight", lam=0.1)
        >>> sorted(n for n, _ in layer.named_parameters())
        ['bias', 'weight', 'weight__spred_u', 'weight__spred_v']
        >>> sorted(layer.state_dict())
        ['bias', 'weight']
        >>> merge(f)
        >>> sorted(n for n, _ in layer.named_parameters())
        ['bias', 'weight']
    """
    weight = module._parameters[name]
    if weight is None:
        raise ValueError(f"`{path}` is None and cannot be penalised.")
    u = nn.Parameter(weight.detach().clone())
    v = nn.Parameter(torch.ones(scale_shape(weight.shape, dim), dtype=weight.dtype, device=weight.device))
    module.register_parameter(name + _U_SUFFIX, u)
    module.register_parameter(name + _V_SUFFIX, v)
    factorization = Factorization(module, name, path, float(lam), dim, float(threshold))
    factorization._handles = [
        module.register_state_dict_post_hook(_drop_factors_hook(factorization)),
        module.register_load_state_dict_pre_hook(_restart_factors_hook(factorization)),
    ]
    return factorization


def merge(factorization: Factorization, threshold: Optional[float] = None) -> None:
    """Write ``u * v`` into the weight (entries ``<= threshold`` become exact zeros) and remove the factors.

    The weight stays the same ``nn.Parameter`` object under the same name, so tied weights stay tied
    and the state dict has the plain model's keys.

    Args:
        factorization: what :func:`factorize` returned.
        threshold: overrides the factorisation's own threshold (``0.0`` keeps every nonzero value).
    """
    with torch.no_grad():
        factorization.weight.copy_(factorization.sparse_weight(threshold))
    for handle in factorization._handles:
        handle.remove()
    factorization._handles.clear()
    del factorization.module._parameters[factorization.name + _U_SUFFIX]
    del factorization.module._parameters[factorization.name + _V_SUFFIX]


def _drop_factors_hook(factorization: Factorization) -> Any:
    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        state_dict.pop(prefix + factorization.name + _U_SUFFIX, None)
        state_dict.pop(prefix + factorization.name + _V_SUFFIX, None)
        if prefix + factorization.name in state_dict:
            state_dict[prefix + factorization.name] = factorization.sparse_weight()

    return hook


def _restart_factors_hook(factorization: Factorization) -> Any:
    # A plain checkpoint (the only kind this package writes) holds `w` but no factors: start the factors
    # from the loaded `w`. The callback's own state, restored after the module's, then sets the exact factors.
    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        weight = state_dict.get(prefix + factorization.name)
        if weight is None:
            return
        state_dict.setdefault(prefix + factorization.name + _U_SUFFIX, weight)
        state_dict.setdefault(
            prefix + factorization.name + _V_SUFFIX, torch.ones_like(factorization.v, device=weight.device)
        )

    return hook
