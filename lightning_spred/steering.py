"""What ``lam`` is at each optimizer step, and the phase of the fit.

Phases of a fit, by optimizer step:

- ``penalise``: ``lam`` is the number (which may be changed during fit), the schedule, or a target's controller
  (:mod:`lightning_spred.targets`);
- ``refit`` (``refit_fraction > 0``, and always at the end of a target's schedule): the zeros become a fixed mask
  and the optimizer trains the plain weights without penalty (the relaxed lasso; pruning's fine-tune). In the
  factors the effective learning rate of ``w`` scales with ``|w|``, so survivors that the penalty shrank would barely
  move: the refit trains ``w`` itself.

With SGD, a ``lam`` that scales with ``lam_max`` (a relative schedule, a target) never passes the stable limit
``lam * lr / (1 - momentum) = 0.5``, beyond which one step of the decay alone halves every factor whatever the loss.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Optional, Union

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_spred.schedules import LamSchedule
from lightning_spred.targets import START, Target, TargetController, nonfinite
from lightning_spred.terms import PenaltyTerms

__all__ = ["Phase", "Steering"]

#: The refit of a target: the last third of the steps (the schedule runs over the first two thirds).
TARGET_REFIT = 1 / 3
#: With SGD, ``lam`` stops where one step of the decay alone would shrink the factors by this fraction.
MAX_DECAY = 0.5


class Phase(str, Enum):
    """The phase of a fit."""

    PENALISE = "penalise"
    REFIT = "refit"


class Steering:
    """The ``lam`` of the scheduled penalty terms at each step, and the phase of the fit.

    Args:
        lam: a number, a :class:`~lightning_spred.schedules.LamSchedule`, or ``None`` with a target (the
            controller's ``lam``, started at ``lam_max * 1e-3``); with a target a number is where ``lam`` starts.
        target: a count of zeros to reach, steered by a :class:`~lightning_spred.targets.TargetController`.
        refit_fraction: the fraction of the steps, at the end, that train the plain weights without penalty within
            the zeros' mask (default: a third with a target, else none).
        threshold: the callback's threshold (a target counts zeros at its ``count_threshold``, or this if larger).

    Raises:
        ValueError: the arguments do not go together (a schedule with a target, neither a ``lam`` nor a target).
    """

    def __init__(
        self,
        lam: Union[float, LamSchedule, None],
        target: Optional[Target] = None,
        refit_fraction: Optional[float] = None,
        threshold: float = 0.0,
    ) -> None:
        if lam is None and target is None:
            raise ValueError(
                "Give `lam` (a number or a schedule), or a target: `target_sparsity=` or `target_groups=`."
            )
        if isinstance(lam, LamSchedule) and target is not None:
            raise ValueError(
                "A target steers `lam` itself: give a target alone (or with a number, where `lam` starts), not with a"
                " schedule."
            )
        if refit_fraction is not None and not (isinstance(refit_fraction, (int, float)) and 0 <= refit_fraction < 1):
            raise ValueError(f"`refit_fraction` must be in [0, 1), got {refit_fraction!r}.")
        self.lam = lam
        self.refit_fraction = refit_fraction
        self.target = None if target is None else TargetController(target, threshold)
        self.lam_max: Optional[float] = None
        self.total_steps: Optional[int] = None
        self._reset()

    def _reset(self) -> None:
        """The state of a fresh fit."""
        self.phase = Phase.PENALISE
        #: the ``lam`` of the scheduled terms at the last optimizer step (what logging and the path report)
        self.current_lam = 0.0
        #: whether that ``lam`` was held at the optimizer's stable limit
        self.at_limit = False
        self._observed = 0  # the last step observed (0: before the first optimizer step)
        self._warned: set[str] = set()

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def has_target(self) -> bool:
        return self.target is not None

    @property
    def relative(self) -> bool:
        """Whether ``lam`` scales with ``lam_max`` (a relative schedule, or a target that steers ``lam`` without a
        starting ``lam``)."""
        steered = self.target is not None and self.target.steers_lam and self.lam is None
        return (isinstance(self.lam, LamSchedule) and self.lam.relative) or steered

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
    def reached_step(self) -> Optional[int]:
        """The step at which a target was reached (the refit began), or ``None``."""
        return None if self.target is None else self.target.state.reached_step

    def describe(self) -> str:
        return self.target.target.describe() if self.target is not None else f"refit_fraction={self.refit_fraction}"

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
        if self.target is not None:
            self.target.begin(terms, resumed)

    def lam_value(self, step: int, epoch: int) -> float:
        """The ``lam`` asked for at this optimizer step, before any limit (no side effects)."""
        if self.phase is Phase.REFIT:
            return 0.0
        if self.target is not None and self.target.steers_lam:
            if self.target.state.lam is not None:
                return self.target.state.lam
            return float(self.lam) if isinstance(self.lam, (int, float)) else START * self.lam_max  # type: ignore[operator]
        if self.target is not None:  # led by magnitude: the lam given, none by default
            return float(self.lam) if isinstance(self.lam, (int, float)) else 0.0
        if isinstance(self.lam, LamSchedule):
            return self.lam(step, epoch) * (self.lam_max if self.lam.relative else 1.0)  # type: ignore[operator]
        return float(self.lam)  # type: ignore[arg-type]

    def start_step(self, step: int, epoch: int, step_size: Optional[float]) -> float:
        """Set this optimizer step's ``lam``: :meth:`lam_value`, held at SGD's stable limit when it scales with
        ``lam_max``; the value is kept as :attr:`current_lam`.

        Args:
            step: the optimizer steps taken so far.
            epoch: the current epoch.
            step_size: ``lr / (1 - momentum)`` of the scheduled weights' SGD groups (``None`` for other optimizers).
        """
        value = self.lam_value(step, epoch)
        steered = self.target is not None and self.target.steers_lam
        if steered:
            value = self.target.lam(value)  # type: ignore[union-attr]
        self.at_limit = bool((self.relative or steered) and step_size and value * step_size > MAX_DECAY)
        if self.at_limit:
            limit = MAX_DECAY / step_size  # type: ignore[operator]
            self._warn_once(
                "stable limit",
                f"SpredCallback: `lam` {value:.4g} would pass SGD's stable limit (lam * lr / (1 - momentum) ="
                f" {MAX_DECAY}, where one step of the decay alone halves every factor, whatever the loss) at step"
                f" {step}: it is held at {limit:.4g}. Lower the learning rate for a larger `lam`.",
            )
            value = limit
            if steered:
                self.target.hold(limit)  # type: ignore[union-attr]
        self.current_lam = value
        return value

    def observe(self, step: int, terms: PenaltyTerms) -> None:
        """After an optimizer step: move to the refit when it is due; with a target, check and prune.

        Called after every batch: with gradient accumulation several batches end at the same step, which counts once.
        """
        if step == self._observed:
            return
        self._observed = step
        refit_step = self.refit_step
        if self.phase is not Phase.PENALISE:
            return
        if refit_step is not None and step >= refit_step:
            self._enter_refit(step, terms)
        elif self.target is not None and step % self.target.target.check_every == 0:
            assert refit_step is not None
            held = self.target.check(step, terms, refit_step)
            if held is not None:
                self._warn_once("non-finite", f"SpredCallback: {held} (no pruning, `lam` unchanged). {_FIX}")

    def _enter_refit(self, step: int, terms: PenaltyTerms) -> None:
        if self.target is not None:
            census = terms.census().host()
            if not census.all_finite:
                self._warn_once(
                    "non-finite",
                    f"SpredCallback: non-finite weights at step {step} ({nonfinite(census)}): the refit does not"
                    f" start. {_FIX}",
                )
                return
        text = self.target.finish(step) if self.target is not None else self.describe()
        terms.freeze()
        self.phase = Phase.REFIT
        rank_zero_info(f"SpredCallback: step {step}, refit phase ({text}): the plain weights train within the zeros.")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The whole state: numbers, strings and tensors only (loadable with ``weights_only``)."""
        state = {
            "lam_max": self.lam_max,
            "phase": self.phase.value,
            "current_lam": self.current_lam,
            "observed": self._observed,
            "warned": sorted(self._warned),
        }
        if self.target is not None:
            state.update(self.target.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        self.lam_max = state.get("lam_max")
        self.phase = Phase(state.get("phase", Phase.PENALISE.value))
        self.current_lam = state.get("current_lam", 0.0)
        self._observed = state.get("observed", 0)
        self._warned = set(state.get("warned", []))
        if self.target is not None:
            self.target.load_state_dict(state)


_FIX = "Lower the learning rate, or clip gradients."
