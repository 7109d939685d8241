"""What ``lam`` is at each step: a number, a schedule, a target to reach, then an optional un-penalised refit.

Phases of a fit, by optimizer step:

- ``penalise``: ``lam`` follows the number (which may be changed during fit) or the schedule;
- ``hold`` (with a target): the target was reached; ``lam`` is held at half the value that reached it, and the
  groups (or entries) that are zero stay zero, so the model converges on the support it reached;
- ``refit`` (with ``refit_fraction > 0``): the last part of the budget trains without penalty, zeros kept:
  the relaxed lasso, or pruning's fine-tune.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from lightning_spred.schedules import GeometricRamp, LamSchedule

__all__ = ["Steering"]

#: Default ramp of a target without a schedule: from this fraction of ``lam_max`` ...
RAMP_START = 1e-3
#: ... to ``lam_max``, over this fraction of the training steps.
RAMP_FRACTION = 0.5
#: On reaching a target, ``lam`` is held at this fraction of the value that reached it. A rising ``lam`` switches
#: groups off with a lag (the last ones decay exponentially, at a rate proportional to how far ``lam`` is past
#: their exit): on the diabetes lasso the count reached ``k`` at 1.4-2x the exact path's ``lam`` for ``k``, so
#: holding there would switch off more groups; at half of it the ``k`` kept groups stay.
HOLD_FACTOR = 0.5


class Steering:
    """The ``lam`` of the scheduled penalty terms at each step, and the phase of the fit.

    Args:
        lam: a number, or a :class:`~lightning_spred.schedules.LamSchedule`; ``None`` with a target means the
            default ramp (``lam_max * 1e-3`` to ``lam_max`` over half of the steps).
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
        self.hold_lam: Optional[float] = None
        self.reached_step: Optional[int] = None
        self._default_ramp: Optional[LamSchedule] = None

    @property
    def _schedule(self) -> Optional[LamSchedule]:
        return self.lam if isinstance(self.lam, LamSchedule) else self._default_ramp

    @property
    def has_target(self) -> bool:
        return self.target_sparsity is not None or self.target_groups is not None

    @property
    def needs_lam_max(self) -> bool:
        relative = self._schedule is not None and self._schedule.relative
        return self.lam_max is None and (relative or (self.has_target and self.lam is None))

    @property
    def refit_step(self) -> int:
        """The first step of the refit phase (``total_steps`` when there is none)."""
        return self.total_steps - int(round(self.refit_fraction * self.total_steps))

    def begin(self, total_steps: int) -> None:
        """Prepare for a fit of ``total_steps`` optimizer steps (a resumed fit keeps its phase and ``lam_max``)."""
        self.total_steps = total_steps
        if self.has_target and self.lam is None:
            self._default_ramp = GeometricRamp(
                RAMP_START, 1.0, steps=max(1, int(RAMP_FRACTION * total_steps)), relative=True
            )

    def value(self, step: int, epoch: int) -> float:
        """``lam`` for the scheduled terms at this optimizer step."""
        if self.phase == "refit":
            return 0.0
        if self.phase == "hold":
            return self.hold_lam  # type: ignore[return-value]
        schedule = self._schedule
        if schedule is None:
            return float(self.lam)  # type: ignore[arg-type]
        value = schedule(step, epoch)
        return value * self.lam_max if schedule.relative else value  # type: ignore[operator]

    def observe(self, step: int, lam: float, sparsity: float, groups: Optional[int]) -> Optional[str]:
        """Move to the next phase after an optimizer step, given what the model now holds; return the new phase."""
        if self.phase != "refit" and self.refit_fraction > 0 and step >= self.refit_step:
            self.phase = "refit"
            return self.phase
        if self.phase == "penalise" and self._reached(sparsity, groups):
            self.phase, self.hold_lam, self.reached_step = "hold", lam * HOLD_FACTOR, step
            return self.phase
        return None

    def _reached(self, sparsity: float, groups: Optional[int]) -> bool:
        if self.target_sparsity is not None:
            return sparsity >= self.target_sparsity
        if self.target_groups is not None:
            return groups is not None and groups <= self.target_groups
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "lam_max": self.lam_max,
            "phase": self.phase,
            "hold_lam": self.hold_lam,
            "reached_step": self.reached_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam_max = state.get("lam_max")
        self.phase = state.get("phase", "penalise")
        self.hold_lam = state.get("hold_lam")
        self.reached_step = state.get("reached_step")
