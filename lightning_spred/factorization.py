"""One penalty term of spred: weights ``w_i = u_i * v`` that share the factor ``v``.

Design: the model keeps its own ``nn.Parameter`` ``w_i`` under its own name and the forward pass uses it
unchanged. The factors are plain tensors held here, not registered on the model, so ``parameters()``,
``state_dict()``, parameter groups, model summaries, weight averaging and DDP all see the plain model.
An optimizer trains the factors only while it steps (see :mod:`lightning_spred.optimizer_hooks`): the
gradient reaching ``w_i`` is turned into the factors' gradients (:func:`~lightning_spred.functional.factor_gradients`)
and, after the step, ``w_i`` is set to ``u_i * v`` with its small entries (or groups) set to exact zero,
so the model always computes with the weights it will keep.

A term can also be *frozen*: its zeros become a fixed mask and the optimizer trains the plain weights again
(a refit: in ``u, v`` the effective learning rate of ``w`` scales with ``|w|``, so small survivors would barely move).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_spred.functional import balance, factor_gradients, joint_group_norms, scale_shape

__all__ = ["Factorization", "Member"]


@dataclass(frozen=True, eq=False)
class Member:
    """A tensor of a penalty term.

    Attributes:
        module: the module that owns the parameter.
        attr: the parameter's attribute name on ``module`` (for example ``"weight"``).
        name: the parameter's name in the whole model (for example ``"encoder.0.weight"``).
        dim: ``None`` for elementwise L1, else the dimension (of :attr:`shape`) whose indices are the groups.
        shape: the view of the parameter in which ``dim`` indexes the groups (``None``: its own shape). A fused
            ``qkv`` weight ``(3 * H * d, E)`` is viewed as ``(3, H, d, E)`` so that dimension 1 indexes its heads.
        aliases: every name of the parameter when it is tied (``name`` first).
    """

    module: nn.Module
    attr: str
    name: str
    dim: Optional[int]
    shape: Optional[tuple[int, ...]] = None
    aliases: tuple[str, ...] = ()

    @property
    def weight(self) -> nn.Parameter:
        return self.module._parameters[self.attr]  # type: ignore[return-value]

    @property
    def tensor(self) -> Tensor:
        """The parameter in the view whose ``dim`` indexes the groups (shares its memory)."""
        return self.view(self.weight)

    def view(self, tensor: Tensor) -> Tensor:
        """``tensor`` (the parameter, its gradient, a saved copy) in this member's view."""
        return tensor if self.shape is None else tensor.view(self.shape)


class Factorization:
    """The weights of one penalty term, factorised as ``w_i = u_i * v``.

    Elementwise L1 has one member and ``v`` of the weight's shape; a group lasso has one entry of ``v``
    per group, shared by all members (a filter and the normalisation scale and shift of its channel).

    Args:
        members: the tensors; grouped members must have the same number of groups along their ``dim``.
        lam: the L1 coefficient (changed between steps by :meth:`PenaltyTerms.apply`).
        threshold: entries (or groups) with magnitude ``<= threshold`` are exact zeros in the model.
        name: the name under which the term is logged and saved (default: the first member's name).
        fixed_lam: the term's own coefficient (``lam_overrides``): it does not follow schedules or targets.
        kind: the kind of its groups (``"input"``, ``"head"``, ``"rank"``, ...), ``None`` for elementwise L1 or a
            dimension index.

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> term = Factorization([Member(layer, "weight", "weight", None)], lam=0.1, threshold=0.0)
        >>> term.start()
        >>> torch.allclose(term.u[0] * term.v, layer.weight)
        True
        >>> sorted(n for n, _ in layer.named_parameters())  # the model is not changed
        ['bias', 'weight']
    """

    def __init__(
        self,
        members: Sequence[Member],
        lam: float,
        threshold: float,
        name: Optional[str] = None,
        fixed_lam: Optional[float] = None,
        kind: Optional[str] = None,
    ) -> None:
        self.members = tuple(members)
        counts = {None if m.dim is None else m.tensor.shape[m.dim] for m in self.members}
        if len(counts) != 1 or (None in counts and len(self.members) > 1):
            raise ValueError(
                f"The tensors of one penalty term must have the same groups: {[m.name for m in self.members]} have"
                f" {sorted(counts, key=str)} groups."
            )
        self.name = name or self.members[0].name
        self.lam = float(lam)
        self.threshold = float(threshold)
        self.fixed_lam = fixed_lam
        self.kind = kind
        #: Whether :meth:`refresh` zeroes small entries after every step (targets zero them at their checks).
        self.zero_every_step = True
        self.u: Optional[list[Tensor]] = None
        self.v: Optional[Tensor] = None
        #: The optimizer's state of ``(*u, v)`` (momentum, moments) between steps.
        self.optimizer_state: Optional[list[dict[str, Any]]] = None
        #: Kept groups (or entries) once frozen; the optimizer then trains the plain weights within this mask.
        self.kept: Optional[Tensor] = None
        #: Each member's Euclidean norm when the term started (on the weights' device).
        self.start_norms: Optional[Tensor] = None
        self._trained = False
        self._buffers: Optional[tuple[Tensor, Optional[Tensor]]] = None
        self._norms: Optional[tuple[tuple[int, ...], Tensor]] = None
        self._product: Optional[Tensor] = None

    def __repr__(self) -> str:
        return f"Factorization({self.name!r}, lam={self.lam:g}, members={[m.name for m in self.members]})"

    @property
    def weights(self) -> list[nn.Parameter]:
        """The parameters, as the model and the optimizer hold them."""
        return [m.weight for m in self.members]

    @property
    def tensors(self) -> list[Tensor]:
        """The parameters in their members' views, where each ``dim`` indexes the groups."""
        return [m.tensor for m in self.members]

    @property
    def dims(self) -> list[Optional[int]]:
        return [m.dim for m in self.members]

    @property
    def grouped(self) -> bool:
        return self.members[0].dim is not None

    @property
    def scheduled(self) -> bool:
        """Whether the term follows the callback's ``lam`` (schedules, targets), not a fixed coefficient of its own."""
        return self.fixed_lam is None

    @property
    def started(self) -> bool:
        """Whether the term has trained: a weight that never trains (frozen, in no optimizer) is never factorised,
        penalised or counted."""
        return self._trained

    @property
    def frozen(self) -> bool:
        """Whether the term's zeros are a fixed mask and its plain weights train (the refit)."""
        return self.kept is not None

    @property
    def trainable(self) -> bool:
        return all(w.requires_grad for w in self.weights)

    @property
    def size(self) -> int:
        """The number of groups (elementwise: entries)."""
        first = self.tensors[0]
        return first.numel() if not self.grouped else first.shape[self.dims[0]]  # type: ignore[index]

    @torch.no_grad()
    def norms(self) -> Tensor:
        """Magnitude of each entry (elementwise) or Euclidean norm of each group across the members.

        Group norms are cached until a weight changes (tracked by the tensors' version counters): after every step
        they are needed for the threshold, the path and the target, and each computation is a pass over the weights.
        """
        tensors = self.tensors
        if not self.grouped:
            return tensors[0].detach().abs()
        versions = self._versions()
        if self._norms is None or self._norms[0] != versions:
            self._norms = (versions, joint_group_norms([t.detach() for t in tensors], self.dims))
        return self._norms[1]

    def _versions(self) -> tuple[int, ...]:
        return tuple(w._version for w in self.weights)

    @torch.no_grad()
    def start(self, factors: Optional[tuple[Sequence[Tensor], Tensor]] = None, scale: Optional[float] = None) -> None:
        """Create the factors: from ``factors`` (a checkpoint), else ``u_i = w_i / c``, ``v = c``.

        By default ``c = sqrt(mean(norms))``, one scale per term: the factors start near balance, where spred acts
        as an L1 penalty, instead of ``u = w, v = 1`` (``scale=1``), which acts as L2 decay until the factors
        balance (about ``lam * sum(lr) / (1 - momentum) >= 2``) but keeps the training dynamics of the plain model
        (near balance the effective learning rate of ``w`` is ``2 |w|`` times the optimizer's). Never the exactly
        balanced split ``sign(w) sqrt|w|, sqrt|w|``: under gradient flow a balanced entry keeps ``|u| = |v|`` and
        can never change sign, which converges to wrong minima.
        """
        first = self.weights[0]
        self._trained = True
        self.start_norms = torch.stack([w.detach().norm() for w in self.weights])
        if factors is not None:
            us, v = factors
            self.u = [u.detach().to(t.device, t.dtype).clone() for u, t in zip(us, self.tensors)]
            self.v = v.detach().to(first.device, first.dtype).clone()
            return
        norms = self.norms()
        if scale is None:
            scale = float(norms.mean().sqrt()) if norms.numel() else 1.0
        scale = scale if scale > 0 else 1.0
        self.u = [t.detach() / scale for t in self.tensors]
        self.v = torch.full_like(norms, scale)

    def accumulate_gradients(self) -> None:
        """Turn the weights' gradients into the factors' gradients (with the decay ``lam``) and clear them.

        The gradients of ``u_i`` are written into the memory of ``w_i.grad``: a fresh weight-sized buffer per step
        costs more than the arithmetic on the CPU.
        """
        assert self.u is not None and self.v is not None, "start() the factorization first"
        weights = self.weights
        if self._buffers is None or self._buffers[0].device != self.v.device:
            largest = max(w.numel() for w in weights) if self.grouped else 0
            scratch = torch.empty(largest, dtype=self.v.dtype, device=self.v.device) if largest else None
            self._buffers = (torch.empty_like(self.v), scratch)
        grad_v, scratch = self._buffers
        grads = [None if w.grad is None else m.view(w.grad) for m, w in zip(self.members, weights)]
        with torch.no_grad():
            grad_us, grad_v = factor_gradients(grads, self.u, self.v, self.dims, self.lam, out=(grads, grad_v, scratch))
        for u, grad, w in zip(self.u, grad_us, weights):
            u.grad, w.grad = grad, None
        self.v.grad = grad_v

    @torch.no_grad()
    def refresh(self) -> None:
        """Set every weight to ``u_i * v``, with entries (or groups) of magnitude ``<= threshold`` exactly zero."""
        assert self.u is not None and self.v is not None
        threshold = self.threshold if self.zero_every_step else 0.0
        if not self.grouped and threshold > 0:
            # two passes instead of four (product, |.|, comparison, fill): the product into a scratch buffer,
            # then hardshrink (zero where |x| <= threshold) into the weight
            if self._product is None or self._product.device != self.v.device:
                self._product = torch.empty_like(self.v)
            torch.mul(self.u[0], self.v, out=self._product)
            torch.ops.aten.hardshrink.out(self._product, threshold, out=self.tensors[0])
            return
        v, norms = self.v, None
        if self.grouped and threshold > 0:
            # ||w_g|| = |v_g| ||u_g||: the small groups are found from the factors and zeroed through v, so the
            # product is the only pass that writes the weights (not product, then norms, then a fill)
            norms = self.factor_norms()
            kept = norms.le(threshold).logical_not_()  # not `>`: a NaN group stays NaN, it is not zeroed
            v, norms = v * kept, norms.mul_(kept)
        for u, t, dim in zip(self.u, self.tensors, self.dims):
            torch.mul(u, v.reshape(scale_shape(u.shape, dim)), out=t)
        if norms is not None:
            self._norms = (self._versions(), norms)

    @torch.no_grad()
    def zero_small(self) -> None:
        """Set entries (or groups) of magnitude ``<= threshold`` of the weights to exact zero, in place."""
        if self.threshold <= 0 or self.frozen:
            return
        norms = self.norms()
        small = norms <= self.threshold
        for t, dim in zip(self.tensors, self.dims):
            t.masked_fill_(small.reshape(scale_shape(t.shape, dim)), 0.0)
        if self.grouped:
            self._norms = (self._versions(), norms.masked_fill(small, 0.0))

    @torch.no_grad()
    def zero_small_in(self, state: dict[str, Tensor]) -> None:
        """The same for the term's tensors in ``state`` (a checkpoint's ``state_dict``, under every alias), by their
        joint norms; the tensors are replaced by thresholded copies (a ``state_dict`` shares the model's memory)."""
        if self.threshold <= 0 or self.frozen or any(m.name not in state for m in self.members):
            return
        tensors = [m.view(state[m.name]) for m in self.members]
        small = joint_group_norms(tensors, self.dims) <= self.threshold
        for m, t, dim in zip(self.members, tensors, self.dims):
            kept = t.masked_fill(small.reshape(scale_shape(t.shape, dim)), 0.0).view_as(state[m.name])
            for name in m.aliases or (m.name,):
                if name in state:
                    state[name] = kept

    @torch.no_grad()
    def factor_norms(self) -> Tensor:
        """Like :meth:`norms`, for ``u * v`` before the threshold: how far a group that was zeroed has decayed."""
        assert self.u is not None and self.v is not None
        if not self.grouped:
            return (self.u[0] * self.v).abs()
        return joint_group_norms(self.u, self.dims).mul_(self.v.abs())

    @torch.no_grad()
    def keep_zeros(self, dead: Optional[Tensor] = None) -> None:
        """Make groups (or entries) stay zero: their weights, factors and optimizer moments become zero.

        ``u = v = 0`` is a stationary point of the factorised objective (both gradients vanish), so from here on
        the optimizer leaves these groups at exactly zero, whatever the loss and ``lam``.

        Args:
            dead: a mask over the groups (shaped like :meth:`norms`); default: the groups that are zero now.
        """
        dead = self.norms() == 0 if dead is None else dead
        for t, dim in zip(self.tensors, self.dims):
            t.masked_fill_(dead.reshape(scale_shape(t.shape, dim)), 0.0)
        if self.u is None or self.v is None:
            return
        views = [scale_shape(u.shape, dim) for u, dim in zip(self.u, self.dims)] + [self.v.shape]
        for tensor, view, state in zip([*self.u, self.v], views, self.optimizer_state or [{}] * len(views)):
            mask = dead.reshape(view)
            tensor.masked_fill_(mask, 0.0)
            for value in state.values():
                if isinstance(value, Tensor) and value.shape == tensor.shape:
                    value.masked_fill_(mask, 0.0)

    @torch.no_grad()
    def freeze(self, kept: Optional[Tensor] = None) -> None:
        """Fix the zeros as a mask (default: the groups that are zero now) and hand training back to the weights."""
        self.kept = (self.norms() != 0) if kept is None else kept.to(torch.bool)
        self.mask_weights()
        self.u = self.v = self.optimizer_state = None
        self._buffers = self._product = None

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of the masked groups of a frozen term: the optimizer then leaves them at zero."""
        assert self.kept is not None
        self._trained = True  # (a term frozen before it ever trained trains from here, within its mask)
        for m, dim in zip(self.members, self.dims):
            grad = m.weight.grad
            if grad is not None:
                m.view(grad).mul_(self.kept.reshape(scale_shape(m.tensor.shape, dim)))

    @torch.no_grad()
    def mask_weights(self) -> None:
        """Set the masked groups of a frozen term to zero (after a step: decoupled weight decay, momentum)."""
        assert self.kept is not None
        for t, dim in zip(self.tensors, self.dims):
            t.mul_(self.kept.reshape(scale_shape(t.shape, dim)))

    def balance(self) -> Tensor:
        """See :func:`~lightning_spred.functional.balance`; ``1.0`` before the factors exist (or once frozen)."""
        if self.u is None or self.v is None or self.frozen:
            return torch.ones((), device=self.weights[0].device)
        return balance(self.u, self.v, self.dims)

    def state_dict(self) -> dict[str, Any]:
        """The factors and their optimizer state (or the frozen mask), detached copies, for a checkpoint."""
        if self.kept is not None:
            return {"kept": self.kept.detach().clone()}
        assert self.u is not None and self.v is not None
        return {
            "u": [u.detach().clone() for u in self.u],
            "v": self.v.detach().clone(),
            "optimizer": _clone(self.optimizer_state),
            "start_norms": _clone(self.start_norms),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (called at the term's first step)."""
        if "kept" in state:
            self.kept = state["kept"].to(self.weights[0].device)
            self._trained = True
            return
        self.start((state["u"], state["v"]))
        self.optimizer_state = state.get("optimizer")
        if state.get("start_norms") is not None:  # (checkpoints of earlier versions: the norms at the resume)
            self.start_norms = state["start_norms"].to(self.weights[0].device)


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value
