"""``lam`` as a function of the training step: warm-ups, geometric ramps, any function.

A schedule is evaluated before every optimizer step with the trainer's ``global_step`` and ``current_epoch``,
so it changes ``lam`` while training continues from where it is (a warm start), and a run resumed from a
checkpoint continues it exactly. With ``relative=True`` its values are fractions of ``lam_max``, the
smallest ``lam`` at which every penalised group would be zero (computed by the callback from one batch, see
:func:`lightning_spred.lam_max.lam_max`).

Example:
    >>> ramp = GeometricRamp(0.01, 1.0, steps=100, delay=10)
    >>> [round(ramp(step), 4) for step in (0, 10, 60, 110, 500)]
    [0.01, 0.01, 0.1, 1.0, 1.0]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable, Literal

__all__ = ["Constant", "GeometricRamp", "LamSchedule", "LambdaSchedule", "Warmup"]


class LamSchedule(ABC):
    """``lam`` at an optimizer step; subclass and implement :meth:`value`.

    Args:
        relative: the values are fractions of ``lam_max`` instead of coefficients.
    """

    def __init__(self, relative: bool = False) -> None:
        self.relative = bool(relative)

    @property
    def length(self) -> int:
        """The step from which the schedule stays at its last value (``0``: from the start or unknown)."""
        return 0

    @abstractmethod
    def value(self, step: int, epoch: int) -> float:
        """``lam`` (or its fraction of ``lam_max``) for the optimizer step ``step`` taken in epoch ``epoch``."""

    def __call__(self, step: int, epoch: int = 0) -> float:
        value = float(self.value(step, epoch))
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{self!r} gave lam={value} at step {step}: a schedule must give finite values >= 0.")
        return value

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"

    def hparams(self) -> dict[str, Any]:
        """What the loggers record as the callback's ``lam``."""
        return {"schedule": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


class Constant(LamSchedule):
    """The same ``lam`` at every step."""

    def __init__(self, lam: float, relative: bool = False) -> None:
        super().__init__(relative)
        self.lam = _positive("lam", lam)

    def value(self, step: int, epoch: int) -> float:
        return self.lam


class Warmup(LamSchedule):
    """``lam`` rising linearly from 0 to ``lam`` over the first ``steps`` steps, then constant.

    Example:
        >>> [Warmup(1.0, steps=4)(s) for s in (0, 2, 4, 9)]
        [0.0, 0.5, 1.0, 1.0]
    """

    def __init__(self, lam: float, steps: int, relative: bool = False) -> None:
        super().__init__(relative)
        self.lam = _positive("lam", lam)
        self.steps = _count("steps", steps)

    @property
    def length(self) -> int:
        return self.steps

    def value(self, step: int, epoch: int) -> float:
        return self.lam * min(1.0, step / self.steps) if self.steps else self.lam


class GeometricRamp(LamSchedule):
    """``start`` for ``delay`` steps, then multiplied by the same factor every step to reach ``end`` after ``steps``.

    The warm-started path of glmnet and LassoNet, inside one fit: each ``lam`` starts from the previous solution,
    so the number of selected features or units falls smoothly instead of jumping to zero.
    """

    def __init__(self, start: float, end: float, steps: int, delay: int = 0, relative: bool = False) -> None:
        super().__init__(relative)
        self.start = _positive("start", start, strict=True)
        self.end = _positive("end", end, strict=True)
        self.steps = _count("steps", steps)
        self.delay = _count("delay", delay)

    @property
    def length(self) -> int:
        return self.delay + self.steps

    def value(self, step: int, epoch: int) -> float:
        progress = min(1.0, max(0, step - self.delay) / self.steps) if self.steps else 1.0
        return self.start * (self.end / self.start) ** progress


class LambdaSchedule(LamSchedule):
    """Any function of the step or of the epoch, like ``ModelPruning``'s ``amount``.

    Args:
        fn: ``fn(step) -> lam`` (or ``fn(epoch)`` with ``interval="epoch"``).
        interval: what ``fn`` takes.
        relative: ``fn`` returns fractions of ``lam_max``.

    Example:
        >>> LambdaSchedule(lambda epoch: 0.1 * epoch, interval="epoch")(step=50, epoch=3)
        0.30000000000000004
    """

    def __init__(
        self, fn: Callable[[int], float], interval: Literal["step", "epoch"] = "step", relative: bool = False
    ) -> None:
        super().__init__(relative)
        if not callable(fn):
            raise TypeError(f"`fn` must be a function of the step or epoch, got {fn!r}.")
        if interval not in ("step", "epoch"):
            raise ValueError(f"`interval` must be 'step' or 'epoch', got {interval!r}.")
        self.fn, self.interval = fn, interval

    def value(self, step: int, epoch: int) -> float:
        return self.fn(step if self.interval == "step" else epoch)


def _positive(name: str, value: Any, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"`{name}` must be a finite number, got {value!r}.")
    if value < 0 or (strict and value == 0):
        raise ValueError(f"`{name}` must be {'> 0' if strict else '>= 0'}, got {value}.")
    return float(value)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be a whole number of steps >= 0, got {value!r}.")
    return value
