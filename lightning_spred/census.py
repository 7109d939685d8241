"""One reading of the penalty terms: zeros, groups in use, balance, penalty, computed where the weights live.

Everything that counts (the logged metrics, the target controller, the path recorder, the dead-layer warning) reads
a :class:`Census`. It is computed with tensor operations on the weights' device and moved to the host once, by
:meth:`Census.host`: on a GPU every ``int(t)``, ``float(t)`` or ``.item()`` waits for the device's queue to empty, so
counting tensor by tensor would stall every step that counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from lightning_spred.factorization import Factorization
from lightning_spred.functional import count_zeros

__all__ = ["Census", "HostCensus"]


@dataclass(frozen=True)
class HostCensus:
    """A :class:`Census` as Python numbers (see there for the fields)."""

    members: tuple[str, ...]
    member_sizes: tuple[int, ...]
    member_zeros: tuple[int, ...]
    member_started: tuple[bool, ...]
    terms: tuple[str, ...]
    grouped: tuple[bool, ...]
    scheduled: tuple[bool, ...]
    started: tuple[bool, ...]
    term_sizes: tuple[int, ...]
    in_use: tuple[int, ...]
    weakest: tuple[float, ...]
    balance: tuple[float, ...]
    penalty: tuple[float, ...]
    finite: tuple[bool, ...]
    extra: dict[str, list[float]] = field(default_factory=dict)

    @property
    def zeros(self) -> int:
        """Zero entries of the tensors that have trained (a frozen weight is not counted)."""
        return sum(z for z, s in zip(self.member_zeros, self.member_started) if s)

    @property
    def entries(self) -> int:
        """Entries of the tensors that have trained."""
        return sum(n for n, s in zip(self.member_sizes, self.member_started) if s)

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.entries, 1)

    @property
    def groups(self) -> Optional[int]:
        """Groups in use over the grouped terms (``None`` without groups)."""
        counts = [n for n, grouped in zip(self.in_use, self.grouped) if grouped]
        return sum(counts) if counts else None

    @property
    def dead(self) -> list[str]:
        """The terms whose weights are all exactly zero."""
        return [name for name, n, s in zip(self.terms, self.in_use, self.started) if s and n == 0]

    @property
    def mean_balance(self) -> float:
        values = [b for b, s in zip(self.balance, self.started) if s]
        return sum(values) / len(values) if values else 1.0

    @property
    def all_finite(self) -> bool:
        return all(self.finite)


@dataclass(frozen=True)
class Census:
    """Counts over the penalty terms, as tensors on the weights' device.

    Attributes:
        members: the names of the penalised tensors (a channel term has several).
        member_sizes: their numbers of entries.
        member_zeros: exact zeros of each tensor.
        member_started: whether each tensor's term has trained: totals count only those (a frozen base model, which
            never trains, is neither penalised nor counted).
        terms: the names of the penalty terms.
        grouped: whether each term has groups.
        scheduled: whether each term follows the callback's ``lam`` (not a ``lam_overrides`` coefficient).
        started: whether each term has trained.
        term_sizes: groups per term (elementwise terms: entries).
        in_use: groups (or entries) of each term that are not zero.
        weakest: the smallest norm of a group in use, per term (``inf`` when none is).
        balance: the factors' balance per term (see :func:`~lightning_spred.functional.balance`).
        penalty: ``lam * sum_g ||w_g||`` per term.
        finite: whether every weight of the term is finite.
        extra: further tensors for whoever reads the census (the controller's forecast), moved in the same transfer.
    """

    members: tuple[str, ...]
    member_sizes: tuple[int, ...]
    member_zeros: Tensor
    member_started: tuple[bool, ...]
    terms: tuple[str, ...]
    grouped: tuple[bool, ...]
    scheduled: tuple[bool, ...]
    started: tuple[bool, ...]
    term_sizes: tuple[int, ...]
    in_use: Tensor
    weakest: Tensor
    balance: Tensor
    penalty: Tensor
    finite: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def of(cls, terms: Sequence[Factorization]) -> Census:
        """Read the terms as they are now."""
        weights = [w for f in terms for w in f.weights]
        device = weights[0].device if weights else torch.device("cpu")
        norms = [f.norms() for f in terms]
        inf = torch.tensor(math.inf, device=device)

        def stack(values: list[Tensor], dtype: torch.dtype = torch.float64) -> Tensor:
            return torch.stack([v.to(device, dtype) for v in values]) if values else torch.zeros(0, device=device)

        return cls(
            members=tuple(m.name for f in terms for m in f.members),
            member_sizes=tuple(w.numel() for w in weights),
            member_zeros=stack([count_zeros(w) for w in weights]),
            member_started=tuple(f.started for f in terms for _ in f.members),
            terms=tuple(f.name for f in terms),
            grouped=tuple(f.grouped for f in terms),
            scheduled=tuple(f.scheduled for f in terms),
            started=tuple(f.started for f in terms),
            term_sizes=tuple(f.size for f in terms),
            in_use=stack([(n != 0).sum() for n in norms]),
            weakest=stack([torch.where(n != 0, n, inf).min() if n.numel() else inf for n in norms]),
            balance=stack([f.balance() for f in terms]),
            penalty=stack([f.lam * n.sum() for f, n in zip(terms, norms)]),
            finite=stack([torch.stack([w.isfinite().all() for w in f.weights]).all() for f in terms]),
        )

    def with_extra(self, **tensors: Tensor) -> Census:
        """The same census carrying further tensors, moved to the host with it."""
        return Census(**{**self.__dict__, "extra": {**self.extra, **tensors}})

    def host(self) -> HostCensus:
        """Every count as Python numbers, through one device-to-host transfer."""
        parts = [self.member_zeros, self.in_use, self.weakest, self.balance, self.penalty, self.finite]
        parts += list(self.extra.values())
        sizes = [p.numel() for p in parts]
        flat = torch.cat([p.reshape(-1).to(torch.float64) for p in parts]).cpu().tolist() if parts else []
        values, start = [], 0
        for size in sizes:
            values.append(flat[start : start + size])
            start += size
        zeros, in_use, weakest, balance, penalty, finite, *extra = values
        return HostCensus(
            members=self.members,
            member_sizes=self.member_sizes,
            member_zeros=tuple(int(z) for z in zeros),
            member_started=self.member_started,
            terms=self.terms,
            grouped=self.grouped,
            scheduled=self.scheduled,
            started=self.started,
            term_sizes=self.term_sizes,
            in_use=tuple(int(n) for n in in_use),
            weakest=tuple(weakest),
            balance=tuple(balance),
            penalty=tuple(penalty),
            finite=tuple(bool(f) for f in finite),
            extra=dict(zip(self.extra, extra)),
        )
