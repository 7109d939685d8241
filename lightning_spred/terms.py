"""The penalty terms of a fit as one collection: building them, their ``lam``, their zeros, their census.

A term (:class:`~lightning_spred.factorization.Factorization`) is one penalised weight, or one channel group (a
layer's weight with its bias and the BatchNorm after it). Terms with a ``lam_overrides`` coefficient keep it; the
others follow the callback's ``lam`` (a number, a schedule, or a target's controller). A :class:`Pool` is a set of
terms whose entries (or groups) are ranked together when a target removes the smallest ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_spred.census import Census
from lightning_spred.channels import channel_members
from lightning_spred.factorization import Factorization, Member
from lightning_spred.parameters import PenalisedParameter

__all__ = ["PenaltyTerms", "Pool"]


class PenaltyTerms(Sequence[Factorization]):
    """The penalty terms of one fit.

    Args:
        terms: the terms, in the order of the model's parameters.
    """

    def __init__(self, terms: Sequence[Factorization] = ()) -> None:
        self._terms = list(terms)

    @classmethod
    def build(cls, model: nn.Module, chosen: Sequence[PenalisedParameter], threshold: float) -> PenaltyTerms:
        """One term per chosen parameter; a ``"channel"`` group also takes the layer's bias and BatchNorm."""
        terms, covered = [], set()
        for p in chosen:
            if id(p.parameter) in covered:
                continue  # already in the channel group of the layer before it
            if p.group is not None and p.group.channel:
                members = channel_members(model, p.name.rpartition(".")[0], p.module)
            else:
                members = [Member(p.module, p.attr, p.name, p.dim)]
            covered |= {id(m.weight) for m in members}
            terms.append(Factorization(members, p.lam or 0.0, threshold, fixed_lam=p.lam))
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

    @property
    def lam(self) -> float:
        """The ``lam`` of the scheduled terms (``0`` when every term has its own)."""
        scheduled = self.scheduled
        return scheduled[0].lam if scheduled else 0.0

    def apply(self, lam: float) -> None:
        """Give every scheduled term ``lam`` and every other its own coefficient; frozen terms have none."""
        for f in self._terms:
            f.lam = 0.0 if f.frozen else lam if f.fixed_lam is None else f.fixed_lam

    def census(self) -> Census:
        return Census.of(self._terms)

    def named_weights(self) -> list[tuple[str, Tensor]]:
        return [(m.name, m.weight) for f in self._terms for m in f.members]

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


@dataclass
class Pool:
    """Terms whose entries (or groups) are ranked together by a target, with the count it asks of them.

    Attributes:
        terms: the terms.
        target: the number of entries (or groups) of the pool that are zero at the target.
        floors: for each term, the entries (or groups) it keeps whatever the target (no layer dies).
    """

    terms: list[Factorization]
    target: int
    floors: list[int]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.terms)

    @property
    def indices(self) -> list[int]:
        return [f.size for f in self.terms]

    @torch.no_grad()
    def magnitudes(self) -> Tensor:
        """Entry magnitudes (or group norms) of all the terms, concatenated, as float."""
        return torch.cat([f.norms().reshape(-1).float() for f in self.terms])

    @torch.no_grad()
    def zero_smallest(self, at_least: int, threshold: float, enabled: Optional[Tensor] = None) -> Tensor:
        """Zero the ``at_least`` smallest entries (or groups), and any others ``<= threshold``, never more than
        :attr:`target` and never into a term's floor; the zeros then stay zero (factors and moments zeroed).

        Both sets are prefixes of the magnitudes in ascending order, so the cut is one value: no transfer to the host.
        ``enabled`` (a boolean tensor, for example "every weight is finite") turns it off without a transfer either.

        Returns:
            On the device: how many were zeroed now, and how many of them were already ``<= threshold`` (switched off
            by the penalty, not chosen by their rank).
        """
        at_least = min(max(at_least, 0), self.target)
        magnitudes = self.magnitudes()
        ranked = magnitudes.clone()
        for part, floor in zip(ranked.split(self.indices), self.floors):
            if 0 < floor <= part.numel():
                part.masked_fill_(part >= torch.topk(part, floor).values[-1], math.inf)  # the floor never goes
        cut = torch.tensor(threshold, device=ranked.device, dtype=ranked.dtype)
        if at_least > 0:
            cut = torch.maximum(cut, torch.kthvalue(ranked, at_least).values)
        if self.target > 0:
            cut = torch.minimum(cut, torch.kthvalue(ranked, self.target).values)
        else:
            cut = torch.full_like(cut, -math.inf)
        if enabled is not None:
            cut = torch.where(enabled, cut, torch.full_like(cut, -math.inf))
        dead = (ranked <= cut) & ranked.isfinite()
        new = dead & (magnitudes != 0)
        for f, part in zip(self.terms, dead.split(self.indices)):
            f.keep_zeros(part.reshape(f.norms().shape) | (f.norms() == 0))
        return torch.stack([new.sum(), (new & (magnitudes <= threshold)).sum()])

    @torch.no_grad()
    def forecast(self, previous: Optional[Tensor], every: int, horizon: int, threshold: float) -> tuple[Tensor, Tensor]:
        """How many entries (or groups) in use are forecast to reach ``threshold`` within ``horizon`` steps, from
        their rate of change since ``previous`` (the magnitudes ``every`` steps ago), and the magnitudes now.

        A switched-off weight decays exponentially, so the zero count lags ``lam``; the forecast leads it.
        """
        now = self.magnitudes()
        alive = now != 0
        if previous is None or previous.shape != now.shape:
            return (alive & (now <= threshold)).sum(), now
        log_now = now.clamp_min(1e-30).log()
        rate = (log_now - previous.clamp_min(1e-30).log()) / every
        exits = alive & (log_now + rate.clamp_max(0) * horizon <= math.log(max(threshold, 1e-30)))
        return exits.sum(), now
