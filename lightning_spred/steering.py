"""What ``lam`` is at each step: a number, a schedule, a target to reach, then an optional un-penalised refit.

Phases of a fit, by optimizer step:

- ``penalise``: ``lam`` follows the number (which may be changed during fit), the schedule, or, for a target
  without a schedule, a geometric ramp that slows down as the target comes near;
- ``hold`` (with a target): the target was reached; ``lam`` is held at half the value that reached it (with
  ``target_groups``, lowered further while the smallest kept group still shrinks), and the groups (or entries)
  that are zero stay zero, so the model converges on the support it reached;
- ``refit`` (with ``refit_fraction > 0``): the last part of the budget trains without penalty, zeros kept:
  the relaxed lasso, or pruning's fine-tune.

Why the ramp slows down: a rising ``lam`` switches groups off with a lag (the last ones decay exponentially, at a
rate proportional to how far ``lam`` is past their exit), so a ramp at full speed overshoots: on NCI60 a network
went from 152 genes to 17 within 100 steps and reached a 10-gene target at 8 times ``lam_max``, where holding even
half of it switched the last 10 off. Near the target the ramp moves at a fraction of its speed
(``(count - target) / target``, at least 5%), so that the count follows ``lam`` closely.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

from lightning_spred.schedules import LamSchedule

__all__ = ["Steering"]

#: Default ramp of a target without a schedule: from this fraction of ``lam_max`` ...
RAMP_START = 1e-3
#: ... at the speed that passes this multiple of ``lam_max`` after ``RAMP_FRACTION`` of the steps, and on
#: (a network's ``lam_max`` moves as it trains: the target decides where to stop).
RAMP_PASSES = 10.0
RAMP_FRACTION = 0.5
#: Near the target the ramp moves at ``max(MIN_SPEED, distance)`` of its speed.
MIN_SPEED = 0.05
#: On reaching a target, ``lam`` is held at this fraction of the value that reached it.
HOLD_FACTOR = 0.5
#: With ``target_groups``, while the smallest kept group keeps shrinking, the held ``lam`` is lowered by this factor
#: per step: it settles where the kept groups stop shrinking.
HOLD_DECAY = 0.99
#: The ramp stops where one SGD step of the decay alone would shrink the factors by this fraction
#: (``lam * lr / (1 - momentum)``): near 1 every factor collapses in a few steps, whatever the loss.
MAX_DECAY = 0.5


class Steering:
    """The ``lam`` of the scheduled penalty terms at each step, and the phase of the fit.

    Args:
        lam: a number, or a :class:`~lightning_spred.schedules.LamSchedule`; ``None`` with a target means the
            default ramp (from ``lam_max * 1e-3``, at a speed that passes ``10 * lam_max`` after half of the
            steps, slowing down near the target).
        target_sparsity: stop raising ``lam`` once this fraction of the penalised weights is zero.
        target_groups: stop raising ``lam`` once at most this many groups (features, units) are in use.
        refit_fraction: the fraction of the steps, at the end, trained without penalty with the zeros kept.
    """

    def __init__(
        self,
        lam: Union[float, LamSchedule, None],
        target_sparsity: Optional[float] = None,
        target_groups: Optional[int] = None,
        refit_fraction: float = 0.0,
    ) -> None:
        self.lam = lam
        self.target_sparsity = target_sparsity
        self.target_groups = target_groups
        self.refit_fraction = refit_fraction
        self.lam_max: Optional[float] = None
        self.total_steps = 0
        self.phase = "penalise"
        self.ramp_lam: Optional[float] = None
        self.hold_lam: Optional[float] = None
        self.reached_step: Optional[int] = None
        self.weakest: Optional[float] = None
        #: the largest ``lr / (1 - momentum)`` of the optimizer groups of the scheduled weights (SGD), set each step
        self.step_size: Optional[float] = None
        self._growth = 1.0

    @property
    def has_target(self) -> bool:
        return self.target_sparsity is not None or self.target_groups is not None

    @property
    def ramps(self) -> bool:
        """Whether ``lam`` is the target's own ramp (a target without a schedule)."""
        return self.has_target and self.lam is None

    @property
    def needs_lam_max(self) -> bool:
        relative = isinstance(self.lam, LamSchedule) and self.lam.relative
        return self.lam_max is None and (relative or self.ramps)

    @property
    def refit_step(self) -> int:
        """The first step of the refit phase (``total_steps`` when there is none)."""
        return self.total_steps - int(round(self.refit_fraction * self.total_steps))

    def begin(self, total_steps: int) -> None:
        """Prepare for a fit of ``total_steps`` optimizer steps (a resumed fit keeps its phase and ``lam``)."""
        self.total_steps = total_steps
        self._growth = (RAMP_PASSES / RAMP_START) ** (1 / max(1.0, RAMP_FRACTION * total_steps))

    def value(self, step: int, epoch: int) -> float:
        """``lam`` for the scheduled terms at this optimizer step."""
        if self.phase == "refit":
            return 0.0
        if self.phase == "hold":
            return self.hold_lam  # type: ignore[return-value]
        if self.ramps:
            if self.ramp_lam is None:
                self.ramp_lam = RAMP_START * self.lam_max  # type: ignore[operator]
            if self.step_size:
                self.ramp_lam = min(self.ramp_lam, MAX_DECAY / self.step_size)
            return self.ramp_lam
        if not isinstance(self.lam, LamSchedule):
            return float(self.lam)  # type: ignore[arg-type]
        value = self.lam(step, epoch)
        return value * self.lam_max if self.lam.relative else value  # type: ignore[operator]

    def observe(
        self, step: int, lam: float, sparsity: float, groups: Optional[int], weakest: Optional[float] = None
    ) -> Optional[str]:
        """Move on after an optimizer step, given what the model now holds; return the new phase if it changed.

        Args:
            step: the optimizer steps taken.
            lam: the ``lam`` of that step.
            sparsity: the fraction of zero weights.
            groups: the groups in use (``None`` without groups).
            weakest: the smallest norm of a group in use.
        """
        if self.phase != "refit" and self.refit_fraction > 0 and step >= self.refit_step:
            self.phase = "refit"
            return self.phase
        if self.phase == "penalise" and self.has_target:
            distance = self._distance(sparsity, groups)
            if distance <= 0:
                self.phase, self.hold_lam, self.reached_step, self.weakest = "hold", lam * HOLD_FACTOR, step, weakest
                return self.phase
            if self.ramps and self.ramp_lam is not None:
                self.ramp_lam *= self._growth ** max(MIN_SPEED, min(1.0, distance))
        elif self.phase == "hold" and self.target_groups is not None and weakest is not None:
            if self.weakest is not None and weakest < self.weakest:
                self.hold_lam *= HOLD_DECAY  # type: ignore[operator]
            self.weakest = weakest
        return None

    def _distance(self, sparsity: float, groups: Optional[int]) -> float:
        """How far the model is from the target, relative to it (``<= 0``: reached)."""
        if self.target_sparsity is not None:
            return (self.target_sparsity - sparsity) / max(1e-12, 1 - self.target_sparsity)
        if groups is None:
            return math.inf
        return (groups - self.target_groups) / max(1, self.target_groups)  # type: ignore[operator]

    def state_dict(self) -> dict[str, Any]:
        return {
            "lam_max": self.lam_max,
            "phase": self.phase,
            "ramp_lam": self.ramp_lam,
            "hold_lam": self.hold_lam,
            "reached_step": self.reached_step,
            "weakest": self.weakest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in self.state_dict():
            setattr(self, key, state.get(key, "penalise" if key == "phase" else None))
