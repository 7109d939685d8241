"""The controller: what ``lam`` is at each step, what a target prunes, and when the refit starts.

Phases of a fit, by optimizer step:

- ``penalise``: ``lam`` is the number (which may be changed during fit), the schedule, or a target's controller;
- ``refit`` (``refit_fraction > 0``, and always at the end of a target's schedule): the zeros become a fixed mask
  and the optimizer trains the plain weights without penalty (the relaxed lasso; pruning's fine-tune). In the
  factors the effective learning rate of ``w`` scales with ``|w|``, so survivors that the penalty shrank would
  barely move (in a probe recorded in the project's notes, refitting them in the factors recovered 0.10-0.38
  accuracy on a digits MLP where refitting the weights recovered 0.94-0.97).

A target (``target_sparsity`` or ``target_groups``) is a schedule of the count, tracked with feedback:

- the count (zero entries, or groups out of use) follows gradual magnitude pruning's cubic schedule, from where the
  model is at the first check to the target at the start of the refit (by default after two thirds of the steps);
- every ``check_every`` steps the controller reads one :class:`~lightning_spred.census.Census`. Where the count lags
  the schedule it zeroes the smallest entries (groups) of spred's own weights up to it, never past the target and
  never into a layer's floor; entries already below ``threshold`` are zeroed too, up to the target. Zeros then stay
  zero (their factors and moments are zeroed: a stationary point);
- ``lam`` follows a leading signal, not the zero count (a switched-off weight decays exponentially, so the count
  lags ``lam``, then jumps): the entries forecast to reach ``threshold`` within a horizon, from their rate of decay
  since the last check. ``lam`` rises while that forecast is below the schedule a horizon ahead and falls while it
  is above;
- who chooses the zeros (``prune_by``): the path (``lam`` rises as far as needed; only at the end of the schedule
  are the smallest pruned, if the count is still short) or magnitude (a ``lam`` that has risen tenfold without a
  single forecast exit is only shrinking the weights it should keep: it goes back to where exits last responded and
  stays at most there, and the schedule's pruning of the smallest weights chooses);
- with SGD, ``lam`` never passes the stable limit ``lam * lr / (1 - momentum) = 0.5``, beyond which one step of
  the decay alone halves every factor whatever the loss.

Entries are ranked together across layers (global magnitude pruning); groups are removed in the same proportion in
every grouped weight (a normalisation sets the scale of a layer's group norms, so they cannot be compared across
layers). Every layer keeps a floor of its own.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, Optional, Sequence, Union

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_spred.census import HostCensus
from lightning_spred.schedules import LamSchedule
from lightning_spred.terms import PenaltyTerms, Pool

__all__ = ["Phase", "Steering"]

#: A target's ``lam`` starts at this fraction of ``lam_max`` (unless given).
START = 1e-3
#: A target's ``lam`` changes by at most this factor per step (x1.2 every 10 steps).
GROWTH = 1.2 ** (1 / 10)
#: The refit of a target: the last third of the steps (the schedule runs over the first two thirds).
TARGET_REFIT = 1 / 3
#: The forecast looks this many checks ahead.
HORIZON_CHECKS = 5
#: A ``lam`` that rose by this factor without a forecast exit goes back and stays at most where exits responded.
UNRESPONSIVE = 10.0
#: With SGD, ``lam`` stops where one step of the decay alone would shrink the factors by this fraction.
MAX_DECAY = 0.5


class Phase(str, Enum):
    """The phase of a fit."""

    PENALISE = "penalise"
    REFIT = "refit"


class Steering:
    """The ``lam`` of the scheduled penalty terms at each step, a target's pruning, and the phase of the fit.

    Args:
        lam: a number, a :class:`~lightning_spred.schedules.LamSchedule`, or ``None`` with a target (the
            controller's ``lam``, started at ``lam_max * 1e-3``); with a target a number is where ``lam`` starts.
        target_sparsity: the fraction of zero entries to reach, in ``(0, 1)``.
        target_groups: the number of groups (features, neurons, channels) to keep.
        refit_fraction: the fraction of the steps, at the end, that train the plain weights without penalty within
            the zeros' mask (default: a third with a target, else none).
        check_every: a target reads its census and prunes every this many optimizer steps.
        layer_floor: with a target, every penalised weight keeps at least this fraction of its share of the kept
            entries (``0.1``: at 90% zeros, 1% of each layer), and at least one group: no layer dies. ``0`` allows it.
        threshold: magnitude at or below which an entry (group) counts as switched off for the forecast.
        prune_by: who chooses a target's zeros. ``"path"``: ``lam`` rises as far as the schedule needs, the weights
            leave as they would along the L1 path, and the smallest are pruned only at the end of the schedule, if
            the count is still short (for feature selection: on the Lasso it keeps the path's exact support, and
            only the input layer is penalised, so the rest of the network trains freely). ``"magnitude"`` (the
            default): ``lam`` rises only while it switches weights off, and the schedule prunes the smallest (for
            compression: on a digits MLP with every layer penalised, at 90% zeros, led by the path it kept 0.919 test
            accuracy, led by magnitude 0.964, as gradual magnitude pruning's 0.963: ``benchmarks/targets.py``).

    Raises:
        TypeError, ValueError: an argument is invalid (checked here, before training).
    """

    def __init__(
        self,
        lam: Union[float, LamSchedule, None],
        target_sparsity: Optional[float] = None,
        target_groups: Optional[int] = None,
        refit_fraction: Optional[float] = None,
        check_every: int = 10,
        layer_floor: float = 0.1,
        threshold: float = 1e-3,
        prune_by: Optional[str] = None,
    ) -> None:
        _check_target(lam, target_sparsity, target_groups)
        if prune_by not in (None, "path", "magnitude"):
            raise ValueError(f"`prune_by` must be 'path', 'magnitude' or None (by the target), got {prune_by!r}.")
        if refit_fraction is not None and not (isinstance(refit_fraction, (int, float)) and 0 <= refit_fraction < 1):
            raise ValueError(f"`refit_fraction` must be in [0, 1), got {refit_fraction!r}.")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"`check_every` must be a number of steps >= 1, got {check_every!r}.")
        if not (isinstance(layer_floor, (int, float)) and 0 <= layer_floor <= 1):
            raise ValueError(f"`layer_floor` must be a fraction in [0, 1], got {layer_floor!r}.")
        self.lam = lam
        self.target_sparsity = target_sparsity
        self.target_groups = target_groups
        self.refit_fraction = refit_fraction
        self.check_every = check_every
        self.layer_floor = float(layer_floor)
        self.threshold = float(threshold)
        self.prune_by = prune_by or "magnitude"
        self.lam_max: Optional[float] = None
        self.total_steps: Optional[int] = None
        self.pools: list[Pool] = []
        #: whether the last ``lam`` was held at the optimizer's stable limit
        self.at_limit = False
        self._reset()

    def _reset(self) -> None:
        """The state of a fresh fit."""
        self.phase = Phase.PENALISE
        self.controlled_lam: Optional[float] = None  # a target's lam
        self.ceiling = math.inf  # the most a target's lam may be, once it proved unresponsive
        self.responsive_lam: Optional[float] = None  # the target's lam at the last check with a forecast exit
        self.schedule_start: Optional[tuple[int, list[int]]] = None  # (step, zeros of each pool) at the first check
        self.reached_step: Optional[int] = None
        self.previous: list[Optional[Tensor]] = []  # each pool's magnitudes at the last check
        self.zeroed = 0  # the zeros a check made
        self.zeroed_by_path = 0  # those that were below the threshold already: the penalty had switched them off
        self._observed = 0  # the last step observed (0: before the first optimizer step)
        self._warned: set[str] = set()

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def has_target(self) -> bool:
        return self.target_sparsity is not None or self.target_groups is not None

    @property
    def relative(self) -> bool:
        """Whether ``lam`` scales with ``lam_max`` (a relative schedule, or a target without a starting ``lam``)."""
        return (isinstance(self.lam, LamSchedule) and self.lam.relative) or (self.has_target and self.lam is None)

    @property
    def needs_lam_max(self) -> bool:
        return self.lam_max is None and self.relative

    @property
    def needs_budget(self) -> bool:
        """Whether the fit's number of steps must be known: targets, relative schedules and refits use it."""
        return self.has_target or self.relative or bool(self.refit_fraction)

    @property
    def effective_refit_fraction(self) -> float:
        if self.refit_fraction is not None:
            return float(self.refit_fraction)
        return TARGET_REFIT if self.has_target else 0.0

    @property
    def refit_step(self) -> Optional[int]:
        """The first step of the refit (``None`` without one); a target's schedule ends there."""
        if self.total_steps is None:
            return None
        fraction = self.effective_refit_fraction
        if fraction == 0 and not self.has_target:
            return None
        return self.total_steps - int(round(fraction * self.total_steps))

    @property
    def path_share(self) -> float:
        """The share of a target's zeros that the penalty had switched off (below the threshold) when they were made
        zero; the others were the smallest on the schedule."""
        return self.zeroed_by_path / self.zeroed if self.zeroed else 0.0

    def describe_target(self) -> str:
        if self.target_sparsity is not None:
            return f"target_sparsity={self.target_sparsity}"
        if self.target_groups is not None:
            return f"target_groups={self.target_groups}"
        return f"refit_fraction={self.refit_fraction}"

    # ---------------------------------------------------------------------------------------------- a fit
    def begin(self, total_steps: Optional[int], terms: PenaltyTerms, resumed: bool) -> None:
        """Prepare a fit of ``total_steps`` optimizer steps: a fresh state unless resuming from a checkpoint.

        Raises:
            ValueError: the target cannot be met by these terms (more groups than there are, no grouped weight).
        """
        if not resumed:
            self._reset()
        self.total_steps = total_steps
        if isinstance(self.lam, LamSchedule) and total_steps and self.lam.length > total_steps:
            rank_zero_warn(
                f"{self.lam!r} reaches its last value at step {self.lam.length}, but this fit takes {total_steps}"
                f" optimizer steps: it ends at {self.lam(total_steps):.4g}"
                + (" (times lam_max)" if self.lam.relative else "")
                + ". Shorten the schedule, or train longer.",
                category=UserWarning,
            )
        self.pools = self._pools(terms) if self.has_target else []
        if len(self.previous) != len(self.pools):
            self.previous = [None] * len(self.pools)
        for f in terms.scheduled:
            # a target zeroes at its checks, capped at the target, not after every step
            f.zero_every_step = not self.has_target or not any(f in pool.terms for pool in self.pools)

    def _pools(self, terms: PenaltyTerms) -> list[Pool]:
        scheduled = [f for f in terms.scheduled if f.trainable]
        if self.target_groups is not None:
            grouped = [f for f in scheduled if f.grouped]
            total = sum(f.size for f in grouped)
            if not grouped:
                raise ValueError(
                    "`target_groups` counts groups, but no penalised weight has groups: give `groups=` (for example"
                    " {'net.0.weight': 'input'})."
                )
            if self.target_groups > total:
                raise ValueError(
                    f"`target_groups={self.target_groups}` is more than the {total} groups of"
                    f" {[f.name for f in grouped]}: ask for at most {total}."
                )
            if self.layer_floor and self.target_groups < len(grouped):
                raise ValueError(
                    f"`target_groups={self.target_groups}` cannot keep a group in each of the {len(grouped)} grouped"
                    f" weights {[f.name for f in grouped]}: ask for at least {len(grouped)}, or let layers die with"
                    " `layer_floor=0`."
                )
            keep = _share(self.target_groups, [f.size for f in grouped], at_least=1 if self.layer_floor else 0)
            return [Pool([f], f.size - k, [k]) for f, k in zip(grouped, keep)]
        assert self.target_sparsity is not None
        fraction = self.target_sparsity
        pools = []
        for f in [f for f in scheduled if f.grouped]:
            kept = max(1 if self.layer_floor else 0, f.size - int(round(fraction * f.size)))
            pools.append(Pool([f], f.size - kept, [kept]))
        entries = [f for f in scheduled if not f.grouped]
        if entries:
            total = sum(f.size for f in entries)
            floors = [math.ceil(self.layer_floor * (1 - fraction) * f.size) for f in entries]
            floors = [max(1, n) if self.layer_floor else 0 for n in floors]
            pools.append(Pool(entries, min(int(round(fraction * total)), total - sum(floors)), floors))
        return pools

    def lam_value(self, step: int, epoch: int, step_size: Optional[float]) -> float:
        """``lam`` for the scheduled terms at this optimizer step.

        Args:
            step: the optimizer steps taken so far.
            epoch: the current epoch.
            step_size: ``lr / (1 - momentum)`` of the scheduled weights' SGD groups (``None`` for other optimizers):
                relative schedules and targets never pass ``MAX_DECAY / step_size``.
        """
        if self.phase is Phase.REFIT:
            return 0.0
        if self.has_target:
            if self.controlled_lam is None:
                self.controlled_lam = float(self.lam) if isinstance(self.lam, (int, float)) else START * self.lam_max
            value = self.controlled_lam
        elif isinstance(self.lam, LamSchedule):
            value = self.lam(step, epoch) * (self.lam_max if self.lam.relative else 1.0)  # type: ignore[operator]
        else:
            value = float(self.lam)  # type: ignore[arg-type]
        self.at_limit = bool((self.relative or self.has_target) and step_size and value * step_size > MAX_DECAY)
        if self.at_limit:
            limit = MAX_DECAY / step_size  # type: ignore[operator]
            self._warn_once(
                "stable limit",
                f"SpredCallback: `lam` {value:.4g} would pass SGD's stable limit (lam * lr / (1 - momentum) ="
                f" {MAX_DECAY}, where one step of the decay alone halves every factor, whatever the loss) at step"
                f" {step}: it is held at {limit:.4g}. Lower the learning rate for a larger `lam`.",
            )
            value = limit
            if self.has_target:
                self.controlled_lam = min(self.controlled_lam, limit)  # type: ignore[type-var]
        return value

    def observe(self, step: int, terms: PenaltyTerms) -> None:
        """After an optimizer step: move to the refit when it is due; with a target, check and prune.

        Called after every batch: with gradient accumulation several batches end at the same step, which counts once.
        """
        if step == self._observed:
            return
        self._observed = step
        refit_step = self.refit_step
        if self.phase is Phase.PENALISE and refit_step is not None and step >= refit_step:
            self._enter_refit(step, terms)
            return
        if self.phase is Phase.PENALISE and self.has_target and step % self.check_every == 0:
            self._check(step, terms)

    def _schedule(self, step: int, index: int) -> int:
        """The zeros pool ``index`` should have after ``step``: the cubic schedule of gradual magnitude pruning."""
        assert self.schedule_start is not None and self.refit_step is not None
        start_step, start_counts = self.schedule_start
        start, end = start_counts[index], self.pools[index].target
        span = max(1, self.refit_step - start_step)
        progress = min(1.0, max(0.0, (step - start_step) / span))
        return int(round(end + (start - end) * (1 - progress) ** 3)) if end > start else start

    def _check(self, step: int, terms: PenaltyTerms) -> None:
        if not self.pools:
            return
        horizon = HORIZON_CHECKS * self.check_every
        zeroed: list[Tensor] = []
        if self.schedule_start is not None:
            # led by the path, only the weights that left by themselves are zeroed (up to the target) until the end
            # of the schedule; led by magnitude, the smallest are pruned wherever the count lags the schedule.
            # Nothing is pruned from non-finite weights (decided on the device: the census below says so).
            finite = torch.stack([w.isfinite().all() for f in terms for w in f.weights]).all()
            for index, pool in enumerate(self.pools):
                at_least = self._schedule(step, index) if self.prune_by == "magnitude" else 0
                zeroed.append(pool.zero_smallest(at_least, self.threshold, enabled=finite))
        forecasts = []
        for index, pool in enumerate(self.pools):
            count, self.previous[index] = pool.forecast(self.previous[index], self.check_every, horizon, self.threshold)
            forecasts.append(count)
        extra = {"forecast": torch.stack(forecasts).to(torch.float64)}
        if zeroed:
            extra["zeroed"] = torch.stack(zeroed).sum(dim=0).to(torch.float64)
        census = terms.census().with_extra(**extra).host()
        if not census.all_finite:
            self._warn_once(
                "non-finite",
                f"SpredCallback: non-finite weights at step {step} ({_nonfinite(census)}): the target's controller"
                " holds (no pruning, `lam` unchanged). Lower the learning rate, or clip gradients.",
            )
            return
        zeros = _pool_zeros(census, self.pools)
        if "zeroed" in census.extra:
            self.zeroed += int(census.extra["zeroed"][0])
            self.zeroed_by_path += int(census.extra["zeroed"][1])
        if self.schedule_start is None:
            self.schedule_start = (step, zeros)
            return
        exits = [int(n) for n in census.extra["forecast"]]
        ahead = sum(self._schedule(step + horizon, i) for i in range(len(self.pools)))
        self._steer(sum(zeros) + sum(exits), ahead, sum(exits) > 0, step)

    def _steer(self, forecast: int, scheduled: int, responded: bool, step: int) -> None:
        assert self.controlled_lam is not None
        lam = self.controlled_lam
        if responded or self.responsive_lam is None:
            self.responsive_lam = lam
        if self.prune_by == "magnitude" and math.isinf(self.ceiling) and lam >= UNRESPONSIVE * self.responsive_lam:
            self.ceiling = self.responsive_lam
            rank_zero_info(
                f"SpredCallback: step {step}, `lam` rose {UNRESPONSIVE:g}x to {lam:.3g} without switching any weight"
                f" off: it stays at most {self.ceiling:.3g}, and the schedule's pruning of the smallest weights"
                " chooses the zeros."
            )
        factor = GROWTH**self.check_every
        lam = lam * factor if forecast < scheduled else lam / factor if forecast > scheduled else lam
        self.controlled_lam = min(lam, self.ceiling)

    def _enter_refit(self, step: int, terms: PenaltyTerms) -> None:
        census = terms.census().host() if self.has_target else None
        if census is not None and not census.all_finite:
            self._warn_once(
                "non-finite",
                f"SpredCallback: non-finite weights at step {step} ({_nonfinite(census)}): the refit does not"
                " start. Lower the learning rate, or clip gradients.",
            )
            return
        final = [pool.zero_smallest(pool.target, self.threshold) for pool in self.pools]  # exactly the target
        if final:
            made = torch.stack(final).sum(dim=0).tolist()
            self.zeroed, self.zeroed_by_path = self.zeroed + made[0], self.zeroed_by_path + made[1]
        terms.freeze()
        self.phase = Phase.REFIT
        text = self.describe_target()
        if self.has_target:
            self.reached_step = step
            text += f"; {self.path_share:.0%} of its zeros switched off by the penalty, the rest pruned by magnitude"
        rank_zero_info(f"SpredCallback: step {step}, refit phase ({text}): the plain weights train within the zeros.")

    # ---------------------------------------------------------------------------------------------- messages
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The whole state of the controller: numbers, strings and tensors only (loadable with ``weights_only``)."""
        start = self.schedule_start
        return {
            "lam_max": self.lam_max,
            "phase": self.phase.value,
            "controlled_lam": self.controlled_lam,
            "ceiling": self.ceiling,
            "responsive_lam": self.responsive_lam,
            "schedule_start_step": None if start is None else start[0],
            "schedule_start_counts": None if start is None else list(start[1]),
            "reached_step": self.reached_step,
            "zeroed": [self.zeroed, self.zeroed_by_path],
            "previous": [None if p is None else p.detach().cpu() for p in self.previous],
            "observed": self._observed,
            "warned": sorted(self._warned),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        self.lam_max = state.get("lam_max")
        self.phase = Phase(state.get("phase", Phase.PENALISE.value))
        self.controlled_lam = state.get("controlled_lam")
        self.ceiling = state.get("ceiling", math.inf)
        self.responsive_lam = state.get("responsive_lam")
        if state.get("schedule_start_step") is not None:
            self.schedule_start = (state["schedule_start_step"], list(state["schedule_start_counts"]))
        self.reached_step = state.get("reached_step")
        self.zeroed, self.zeroed_by_path = state.get("zeroed", [0, 0])
        self.previous = list(state.get("previous", []))
        self._observed = state.get("observed", 0)
        self._warned = set(state.get("warned", []))


def _check_target(
    lam: Union[float, LamSchedule, None], target_sparsity: Optional[float], target_groups: Optional[int]
) -> None:
    if lam is None and target_sparsity is None and target_groups is None:
        raise ValueError("Give `lam` (a number or a schedule), or a target: `target_sparsity=` or `target_groups=`.")
    if target_sparsity is not None and target_groups is not None:
        raise ValueError("Give one target: `target_sparsity` or `target_groups`, not both.")
    if isinstance(lam, LamSchedule) and (target_sparsity is not None or target_groups is not None):
        raise ValueError(
            "A target steers `lam` itself: give a target alone (or with a number, where `lam` starts), not with a"
            " schedule."
        )
    if target_sparsity is not None:
        if isinstance(target_sparsity, bool) or not isinstance(target_sparsity, (int, float)):
            raise TypeError(f"`target_sparsity` must be a fraction such as 0.9, got {target_sparsity!r}.")
        if not 0 < target_sparsity < 1:
            raise ValueError(f"`target_sparsity` is a fraction of zero weights in (0, 1), got {target_sparsity}.")
    if target_groups is not None:
        if isinstance(target_groups, bool) or not isinstance(target_groups, int):
            raise TypeError(f"`target_groups` must be a whole number of groups, got {target_groups!r}.")
        if target_groups < 0:
            raise ValueError(f"`target_groups` must be >= 0, got {target_groups}.")


def _share(total: int, sizes: Sequence[int], at_least: int) -> list[int]:
    """``total`` split over ``sizes`` in proportion (largest remainders), each part at least ``at_least``.

    Example:
        >>> _share(10, [32, 64, 64], at_least=1)
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


def _pool_zeros(census: HostCensus, pools: Sequence[Pool]) -> list[int]:
    """Zero entries (or groups out of use) of each pool, from the census."""
    size = dict(zip(census.terms, census.term_sizes))
    used = dict(zip(census.terms, census.in_use))
    return [sum(size[f.name] - used[f.name] for f in pool.terms) for pool in pools]


def _nonfinite(census: HostCensus) -> str:
    names = [name for name, finite in zip(census.terms, census.finite) if not finite]
    return "in " + ", ".join(f"`{n}`" for n in names)
