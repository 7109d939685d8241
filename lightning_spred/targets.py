"""Targets: a count of zeros to reach (a fraction of the weights, or a number of groups kept), and its controller.

A target is a schedule of the count, tracked with feedback:

- the count (zero entries, or groups out of use) follows gradual magnitude pruning's cubic schedule (Zhu & Gupta
  2017), from where the model is at the first check to the target at the start of the refit;
- every ``check_every`` steps the controller reads one :class:`~lightning_spred.census.Census`. Where the count lags
  the schedule it zeroes the smallest entries (groups) of spred's own weights up to it, never past the target and
  never into a layer's floor; entries already below the counting threshold are zeroed too, up to the target. Zeros then
  stay zero (their factors and moments are zeroed: a stationary point);
- who chooses the zeros (``prune_by``): magnitude (the factors train without a penalty, unless a ``lam`` is given,
  and the schedule's pruning of the smallest weights chooses), or the path: ``lam`` follows a leading signal, not the
  zero count (a switched-off weight decays exponentially, so the count lags ``lam``, then jumps): the entries forecast
  to reach the counting threshold within a horizon, from their rate of decay since the last check. ``lam`` rises while
  that forecast is below the schedule a horizon ahead and falls while it is above, and only at the end of the schedule
  are the smallest pruned, if the count is still short.

Why a target led by magnitude has no penalty of its own: with Adam, a penalty on factors started at ``u = w, v = 1``
dominates the gradient of ``v`` wherever the loss gradient times the small ``u`` is smaller (every weight of a
transformer, initialised near 0.02), and Adam's normalised steps then shrink every weight at the learning rate's pace,
whatever ``lam``: on a character-level GPT-2 at 90% zeros, validation loss 2.69 with the penalty, 2.31 without it and
2.33 for gradual magnitude pruning (``docs/design.md``).

Entries are ranked together across layers (global magnitude pruning); groups are removed in the same proportion in
every grouped weight (a normalisation sets the scale of a layer's group norms, so they cannot be compared across
layers). Every layer keeps a floor of its own. Why each choice was made, with its measurements: ``docs/design.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from lightning_spred.census import HostCensus
from lightning_spred.factorization import Factorization
from lightning_spred.functional import forecast_exits
from lightning_spred.terms import PenaltyTerms

__all__ = ["Pool", "Target", "TargetController"]

#: A target's ``lam`` starts at this fraction of ``lam_max`` (unless given).
START = 1e-3
#: A target's ``lam`` changes by at most this factor per step (x1.2 every 10 steps).
GROWTH = 1.2 ** (1 / 10)
#: The forecast looks this many checks ahead.
HORIZON_CHECKS = 5


@dataclass(frozen=True)
class Target:
    """A count of zeros to reach by the end of a fit's schedule, and how the controller gets there.

    Give one of ``sparsity`` and ``groups``. Pass it to the callback where ``lam`` goes
    (``SpredCallback(Target(sparsity=0.9))``), or with the keywords ``target_sparsity=`` and ``target_groups=``.

    Args:
        sparsity: the fraction of the penalised entries to make zero (grouped weights: of their groups), in ``(0, 1)``.
        groups: the number of groups (features, neurons, channels, heads) to keep.
        check_every: the controller reads its counts (one device-to-host transfer) and prunes every this many steps.
        layer_floor: every penalised weight keeps at least this fraction of its share of the kept entries, and at least
            one group (``0.1``: at 90% zeros, 1% of each layer); ``0`` lets layers die.
        prune_by: who chooses the zeros. ``"path"``: ``lam`` rises as far as the schedule needs and the weights leave
            as they would along the L1 path; the smallest are pruned only at the end of the schedule, if the count is
            still short (the default of ``groups`` on ``"input"`` groups: feature selection). ``"magnitude"``: the
            schedule prunes the smallest, and the factors train with the ``lam`` given to the callback, none by
            default (the default otherwise: compression).
        count_threshold: magnitude at or below which an entry (group) counts as switched off for the target's count
            and forecast (the callback's ``threshold`` when that is larger). A switched-off weight decays exponentially,
            so a short run's count at ``1e-6`` lags far behind its forecast.

    Raises:
        TypeError, ValueError: an argument is invalid.

    Example:
        >>> Target(sparsity=0.9)
        Target(sparsity=0.9, groups=None, check_every=10, layer_floor=0.1, prune_by=None, count_threshold=0.001)
        >>> Target(sparsity=1.5)
        Traceback (most recent call last):
        ...
        ValueError: `target_sparsity` is a fraction of zero weights in (0, 1), got 1.5.
    """

    sparsity: Optional[float] = None
    groups: Optional[int] = None
    check_every: int = 10
    layer_floor: float = 0.1
    prune_by: Optional[str] = None
    count_threshold: float = 1e-3

    def __post_init__(self) -> None:
        if (self.sparsity is None) == (self.groups is None):
            raise ValueError("Give one target: `target_sparsity` (a fraction) or `target_groups` (a count), not both.")
        if self.sparsity is not None:
            if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
                raise TypeError(f"`target_sparsity` must be a fraction such as 0.9, got {self.sparsity!r}.")
            if not 0 < self.sparsity < 1:
                raise ValueError(f"`target_sparsity` is a fraction of zero weights in (0, 1), got {self.sparsity}.")
        if self.groups is not None:
            if isinstance(self.groups, bool) or not isinstance(self.groups, int):
                raise TypeError(f"`target_groups` must be a whole number of groups, got {self.groups!r}.")
            if self.groups < 0:
                raise ValueError(f"`target_groups` must be >= 0, got {self.groups}.")
        if self.prune_by not in (None, "path", "magnitude"):
            raise ValueError(f"`prune_by` must be 'path', 'magnitude' or None (by the target), got {self.prune_by!r}.")
        if isinstance(self.check_every, bool) or not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"`check_every` must be a number of steps >= 1, got {self.check_every!r}.")
        if not (isinstance(self.layer_floor, (int, float)) and 0 <= self.layer_floor <= 1):
            raise ValueError(f"`layer_floor` must be a fraction in [0, 1], got {self.layer_floor!r}.")
        if not (isinstance(self.count_threshold, (int, float)) and 0 <= self.count_threshold < math.inf):
            raise ValueError(f"`count_threshold` must be a magnitude >= 0, got {self.count_threshold!r}.")

    def describe(self) -> str:
        return f"target_sparsity={self.sparsity}" if self.sparsity is not None else f"target_groups={self.groups}"

    def hparams(self) -> dict[str, Any]:
        return {"target_sparsity": self.sparsity, "target_groups": self.groups, "prune_by": self.prune_by}


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
    def indices(self) -> list[int]:
        return [f.size for f in self.terms]

    @torch.no_grad()
    def magnitudes(self) -> Tensor:
        """Entry magnitudes (or group norms) of all the terms, concatenated, as float."""
        return magnitudes(self.terms)

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
        values = self.magnitudes()
        ranked = values.clone()
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
        new = dead & (values != 0)
        for f, part in zip(self.terms, dead.split(self.indices)):
            f.keep_zeros(part.reshape(f.norms().shape) | (f.norms() == 0))
        return torch.stack([new.sum(), (new & (values <= threshold)).sum()])


def magnitudes(terms: Sequence[Factorization]) -> Tensor:
    """Entry magnitudes (or group norms) of ``terms``, concatenated, as float."""
    return torch.cat([f.norms().reshape(-1).float() for f in terms])


@dataclass
class _ControllerState:
    """What a target's controller learns during one fit (saved in checkpoints)."""

    lam: Optional[float] = None  # the target's lam
    schedule_start: Optional[tuple[int, list[int]]] = None  # (step, zeros of each pool) at the first check
    reached_step: Optional[int] = None
    previous: list[Optional[Tensor]] = field(default_factory=list)  # each pool's magnitudes at the last check
    zeroed: int = 0  # the zeros the checks made
    zeroed_by_path: int = 0  # those that were below the counting threshold already: the penalty switched them off


class TargetController:
    """Steers ``lam`` and prunes so that the count follows the target's schedule (see the module's docstring).

    Args:
        target: the target.
        threshold: the callback's threshold (the counting threshold is at least this).
    """

    def __init__(self, target: Target, threshold: float) -> None:
        self.target = target
        self.threshold = max(float(threshold), target.count_threshold)
        self.prune_by = target.prune_by or "magnitude"
        self.pools: list[Pool] = []
        self.state = _ControllerState()

    @property
    def steers_lam(self) -> bool:
        """Whether the controller sets ``lam`` (led by the path); led by magnitude, ``lam`` is the callback's own."""
        return self.prune_by == "path"

    @property
    def path_share(self) -> float:
        """The share of the zeros that the penalty had switched off (below the counting threshold) when they were made
        zero; the others were the smallest on the schedule."""
        state = self.state
        return state.zeroed_by_path / state.zeroed if state.zeroed else 0.0

    def begin(self, terms: PenaltyTerms, resumed: bool) -> None:
        """Prepare a fit: pools of the trainable scheduled terms; a fresh state unless resuming.

        Raises:
            ValueError: the target cannot be met by these terms (more groups than there are, no grouped weight).
        """
        if not resumed:
            self.state = _ControllerState()
        self.pools = self._pools(terms)
        if len(self.state.previous) != len(self.pools):
            self.state.previous = [None] * len(self.pools)
        pooled = {id(f) for pool in self.pools for f in pool.terms}
        for f in terms.scheduled:
            f.zero_every_step = id(f) not in pooled  # a target zeroes at its checks, capped at the target

    def lam(self, start: float) -> float:
        """The controller's ``lam`` (``start`` until it has one)."""
        if self.state.lam is None:
            self.state.lam = start
        return self.state.lam

    def hold(self, limit: float) -> None:
        """``lam`` was held at an optimizer's stable limit: the controller's ``lam`` goes no higher."""
        if self.state.lam is not None:
            self.state.lam = min(self.state.lam, limit)

    def check(self, step: int, terms: PenaltyTerms, refit_step: int) -> Optional[str]:
        """Every ``check_every`` steps: prune to the schedule; led by the path, forecast and steer ``lam``.

        Returns:
            A message when the check found non-finite weights and held (no pruning, ``lam`` unchanged), else ``None``.
        """
        if not self.pools:
            return None
        state = self.state
        every = self.target.check_every
        horizon = HORIZON_CHECKS * every
        zeroed: list[Tensor] = []
        if state.schedule_start is not None:
            # led by the path, only the weights that left by themselves are zeroed (up to the target) until the end
            # of the schedule; led by magnitude, the smallest are pruned wherever the count lags the schedule.
            # Nothing is pruned from non-finite weights (decided on the device: the census below says so).
            finite = torch.stack([w.isfinite().all() for f in terms for w in f.weights]).all()
            for index, pool in enumerate(self.pools):
                at_least = self._schedule(step, index, refit_step) if self.prune_by == "magnitude" else 0
                zeroed.append(pool.zero_smallest(at_least, self.threshold, enabled=finite))
        extra = {}
        if self.steers_lam:
            forecasts = []
            for index, pool in enumerate(self.pools):
                now = pool.magnitudes()
                forecasts.append(forecast_exits(state.previous[index], now, every, horizon, self.threshold))
                state.previous[index] = now
            extra["forecast"] = torch.stack(forecasts).to(torch.float64)
        if zeroed:
            extra["zeroed"] = torch.stack(zeroed).sum(dim=0).to(torch.float64)
        census = terms.census().with_extra(**extra).host()
        if not census.all_finite:
            return f"non-finite weights at step {step} ({nonfinite(census)}): the target's controller holds"
        zeros = self._pool_zeros(census)
        if "zeroed" in census.extra:
            state.zeroed += int(census.extra["zeroed"][0])
            state.zeroed_by_path += int(census.extra["zeroed"][1])
        if state.schedule_start is None:
            state.schedule_start = (step, zeros)
        elif self.steers_lam:
            exits = [int(n) for n in census.extra["forecast"]]
            ahead = sum(self._schedule(step + horizon, i, refit_step) for i in range(len(self.pools)))
            self._steer(sum(zeros) + sum(exits), ahead)
        return None

    def finish(self, step: int) -> str:
        """At the start of the refit: the smallest pruned up to exactly the target; a line for the log."""
        final = [pool.zero_smallest(pool.target, self.threshold) for pool in self.pools]
        if final:
            made = torch.stack(final).sum(dim=0).tolist()
            self.state.zeroed += int(made[0])
            self.state.zeroed_by_path += int(made[1])
        self.state.reached_step = step
        if not self.steers_lam:
            return f"{self.target.describe()}, pruned by magnitude on the schedule"
        return (
            f"{self.target.describe()}; {self.path_share:.0%} of its zeros switched off by the penalty, the rest pruned"
            " by magnitude"
        )

    # ---------------------------------------------------------------------------------------------- internals
    def _pools(self, terms: PenaltyTerms) -> list[Pool]:
        scheduled = [f for f in terms.scheduled if f.trainable]
        floor = self.target.layer_floor
        if self.target.groups is not None:
            wanted = self.target.groups
            grouped = [f for f in scheduled if f.grouped]
            total = sum(f.size for f in grouped)
            if not grouped:
                raise ValueError(
                    "`target_groups` counts groups, but no penalised weight has groups: give `groups=` (for example"
                    " {'net.0.weight': 'input'})."
                )
            if wanted > total:
                raise ValueError(
                    f"`target_groups={wanted}` is more than the {total} groups of {[f.name for f in grouped]}: ask for"
                    f" at most {total}."
                )
            if floor and wanted < len(grouped):
                raise ValueError(
                    f"`target_groups={wanted}` cannot keep a group in each of the {len(grouped)} grouped weights"
                    f" {[f.name for f in grouped]}: ask for at least {len(grouped)}, or let layers die with"
                    " `layer_floor=0`."
                )
            keep = share(wanted, [f.size for f in grouped], at_least=1 if floor else 0)
            return [Pool([f], f.size - k, [k]) for f, k in zip(grouped, keep)]
        fraction = self.target.sparsity
        assert fraction is not None
        pools = []
        for f in [f for f in scheduled if f.grouped]:
            kept = max(1 if floor else 0, f.size - int(round(fraction * f.size)))
            pools.append(Pool([f], f.size - kept, [kept]))
        entries = [f for f in scheduled if not f.grouped]
        if entries:
            total = sum(f.size for f in entries)
            floors = [math.ceil(floor * (1 - fraction) * f.size) for f in entries]
            floors = [max(1, n) if floor else 0 for n in floors]
            pools.append(Pool(entries, min(int(round(fraction * total)), total - sum(floors)), floors))
        return pools

    def _schedule(self, step: int, index: int, refit_step: int) -> int:
        """The zeros pool ``index`` should have after ``step``: the cubic schedule of gradual magnitude pruning."""
        assert self.state.schedule_start is not None
        start_step, start_counts = self.state.schedule_start
        start, end = start_counts[index], self.pools[index].target
        span = max(1, refit_step - start_step)
        progress = min(1.0, max(0.0, (step - start_step) / span))
        return int(round(end + (start - end) * (1 - progress) ** 3)) if end > start else start

    def _steer(self, forecast: int, scheduled: int) -> None:
        """``lam`` up while the forecast count is behind the schedule a horizon ahead, down while it is ahead."""
        assert self.state.lam is not None
        factor = GROWTH**self.target.check_every
        lam = self.state.lam
        self.state.lam = lam * factor if forecast < scheduled else lam / factor if forecast > scheduled else lam

    def _pool_zeros(self, census: HostCensus) -> list[int]:
        """Zero entries (or groups out of use) of each pool, from the census."""
        size = dict(zip(census.terms, census.term_sizes))
        used = dict(zip(census.terms, census.in_use))
        return [sum(size[f.name] - used[f.name] for f in pool.terms) for pool in self.pools]

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Numbers, strings and tensors only (loadable with ``weights_only``)."""
        state = self.state
        start = state.schedule_start
        return {
            "controlled_lam": state.lam,
            "schedule_start_step": None if start is None else start[0],
            "schedule_start_counts": None if start is None else list(start[1]),
            "reached_step": state.reached_step,
            "zeroed": [state.zeroed, state.zeroed_by_path],
            "previous": [None if p is None else p.detach().cpu() for p in state.previous],
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        start = saved.get("schedule_start_step")
        self.state = _ControllerState(
            lam=saved.get("controlled_lam"),
            schedule_start=None if start is None else (start, list(saved["schedule_start_counts"])),
            reached_step=saved.get("reached_step"),
            previous=list(saved.get("previous", [])),
            zeroed=saved.get("zeroed", [0, 0])[0],
            zeroed_by_path=saved.get("zeroed", [0, 0])[1],
        )


def share(total: int, sizes: Sequence[int], at_least: int) -> list[int]:
    """``total`` split over ``sizes`` in proportion (largest remainders), each part at least ``at_least``.

    Example:
        >>> share(10, [32, 64, 64], at_least=1)
        [2, 4, 4]
    """
    whole = sum(sizes)
    exact = [total * s / whole for s in sizes]
    parts = [max(at_least, min(s, math.floor(e))) for s, e in zip(sizes, exact)]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    for i in order:
        if sum(parts) >= total:
            break
        if parts[i] < sizes[i]:
            parts[i] += 1
    return parts


def nonfinite(census: HostCensus) -> str:
    """Where a census found non-finite weights, for messages."""
    names = [name for name, finite in zip(census.terms, census.finite) if not finite]
    return "in " + ", ".join(f"`{n}`" for n in names)
