"""The penalty terms of a fit as one collection: building them, their ``lam``, their zeros, their census.

A term (:class:`~lightning_spred.factorization.Factorization`) is one penalised weight, or the tensors of one set of
groups (a channel group: a layer's weight with its bias and the BatchNorm after it; an attention's heads). Terms with a
``lam_overrides`` coefficient keep it; the others follow the callback's ``lam`` (a number, a schedule, or a target's
controller).
"""

from __future__ import annotations

from typing import Iterator, Sequence

from torch import Tensor

from lightning_spred.census import Census
from lightning_spred.factorization import Factorization, Member
from lightning_spred.selection import PenalisedParameter

__all__ = ["PenaltyTerms"]


class PenaltyTerms(Sequence[Factorization]):
    """The penalty terms of one fit.

    Args:
        terms: the terms, in the order of the model's parameters.
    """

    def __init__(self, terms: Sequence[Factorization] = ()) -> None:
        self._terms = list(terms)

    @classmethod
    def build(cls, chosen: Sequence[PenalisedParameter], threshold: float) -> PenaltyTerms:
        """One term per chosen parameter, or per set of parameters that share a term (a channel, an attention's
        heads), in the order of their first parameter."""
        by_term: dict[str, list[PenalisedParameter]] = {}
        for p in chosen:
            by_term.setdefault(p.term_name, []).append(p)
        terms = []
        for name, parts in by_term.items():
            members = [Member(p.module, p.attr, p.name, p.dim, p.shape, p.aliases) for p in parts]
            lam = parts[0].lam
            terms.append(Factorization(members, lam or 0.0, threshold, name=name, fixed_lam=lam, kind=parts[0].kind))
        return cls(terms)

    def __getitem__(self, index: int) -> Factorization:  # type: ignore[override]
        return self._terms[index]

    def __len__(self) -> int:
        return len(self._terms)

    def __iter__(self) -> Iterator[Factorization]:
        return iter(self._terms)

    @property
    def scheduled(self) -> list[Factorization]:
        """The terms that follow the callback's ``lam`` (all but those with a ``lam_overrides`` coefficient)."""
        return [f for f in self._terms if f.scheduled]

    @property
    def grouped(self) -> list[Factorization]:
        return [f for f in self._terms if f.grouped]

    def apply(self, lam: float) -> None:
        """Give every scheduled term ``lam`` and every other its own coefficient; frozen terms have none."""
        for f in self._terms:
            f.lam = 0.0 if f.frozen else lam if f.fixed_lam is None else f.fixed_lam

    def census(self) -> Census:
        return Census.of(self._terms)

    def named_weights(self) -> list[tuple[str, Tensor]]:
        """The weights of the terms that have trained, by name: a weight that never trained (a frozen base model) is
        neither penalised nor reported."""
        return [(m.name, m.weight) for f in self._terms if f.started for m in f.members]

    def keep_zeros(self, scheduled_only: bool = False) -> None:
        """Make the zeros of the (scheduled) terms stay zero: see :meth:`Factorization.keep_zeros`."""
        for f in self.scheduled if scheduled_only else self._terms:
            if f.started and not f.frozen:
                f.keep_zeros()

    def freeze(self) -> None:
        """Fix every term's zeros as a mask and train the plain weights from now on (a refit)."""
        for f in self._terms:
            if not f.frozen:
                f.freeze()

    def zero_small(self) -> None:
        """Threshold the weights once more (a weight averaging callback may have replaced them)."""
        for f in self._terms:
            if f.started:
                f.zero_small()
