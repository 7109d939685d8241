"""The regularisation path inside one fit: points along a rising ``lam``, and when each group switched off.

While ``lam`` rises (a schedule or a target's ramp), every step warm-starts from the previous one, as glmnet and
LassoNet do between the points of their paths. :class:`PathRecorder` keeps, for every grouped weight, the ``lam``
at which each group last became zero (LassoNet's feature importance: the later a feature leaves, the more it
matters) and, when asked, points with the sparsity, the trainer's metrics and a snapshot of the sparse model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any, Callable, Iterable, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_spred.factorization import Factorization

__all__ = ["Path", "PathPoint", "PathRecorder"]


@dataclass(frozen=True)
class PathPoint:
    """One point of the path.

    Attributes:
        step: the optimizer step after which it was recorded.
        epoch: the epoch.
        lam: the ``lam`` of the scheduled terms at that step.
        nonzeros: nonzero entries over all penalised weights.
        sparsity: fraction of zero entries over all penalised weights.
        groups: groups in use, per grouped weight.
        metrics: the trainer's logged metrics at that time (``trainer.callback_metrics``), as floats.
        snapshot: the model's ``state_dict`` (a CPU copy), or the file it was saved to.
    """

    step: int
    epoch: int
    lam: float
    nonzeros: int
    sparsity: float
    groups: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    snapshot: Union[dict[str, Tensor], str, None] = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """A flat row for tables: step, epoch, lam, nonzeros, sparsity, ``groups/<name>``, metrics."""
        row = {"step": self.step, "epoch": self.epoch, "lam": self.lam, "nonzeros": self.nonzeros}
        row["sparsity"] = self.sparsity
        row.update({f"groups/{name}": count for name, count in self.groups.items()})
        row.update(self.metrics)
        return row


class Path(list):
    """The recorded points, oldest first, with helpers to choose one."""

    def table(self) -> list[dict[str, Any]]:
        """One flat row per point (see :meth:`PathPoint.as_dict`)."""
        return [point.as_dict() for point in self]

    def best(
        self,
        monitor: str,
        mode: Literal["min", "max"] = "min",
        max_nonzeros: Optional[int] = None,
        max_groups: Optional[int] = None,
    ) -> PathPoint:
        """The point with the best ``monitor`` among those within the constraints.

        Args:
            monitor: a metric the trainer logged (for example ``"val_loss"``).
            mode: whether smaller or larger is better.
            max_nonzeros: only points with at most this many nonzero weights.
            max_groups: only points with at most this many groups in use (summed over grouped weights).

        Raises:
            ValueError: no point has ``monitor`` and meets the constraints.
        """
        candidates = [
            p
            for p in self
            if monitor in p.metrics
            and (max_nonzeros is None or p.nonzeros <= max_nonzeros)
            and (max_groups is None or sum(p.groups.values()) <= max_groups)
        ]
        if not candidates:
            logged = sorted({k for p in self for k in p.metrics})
            raise ValueError(
                f"No path point has `{monitor}` within max_nonzeros={max_nonzeros}, max_groups={max_groups}."
                f" Metrics on the path: {logged}. Log the metric during validation, or loosen the constraint."
            )
        sign = 1 if mode == "min" else -1
        return min(candidates, key=lambda p: sign * p.metrics[monitor])


class PathRecorder:
    """Tracks when each group switches off, and records path points on request.

    Args:
        directory: where snapshots are saved (``point_<step>.pt``); ``None`` keeps them in memory on the CPU.
    """

    def __init__(self, directory: Optional[Union[str, FilePath]] = None) -> None:
        self.directory = FilePath(directory) if directory is not None else None
        self.points = Path()
        self.exit_lam: dict[str, Tensor] = {}

    def track(self, terms: Iterable[Factorization], lam: Callable[[Factorization], float]) -> None:
        """After a step: a group that is zero now and was not before left at this step's ``lam``."""
        for f in terms:
            if not f.grouped:
                continue
            dead = f.norms() == 0
            exits = self.exit_lam.get(f.name)
            if exits is None or exits.shape != dead.shape:
                exits = self.exit_lam[f.name] = torch.full(dead.shape, math.inf, device=dead.device)
            exits.masked_fill_(dead & exits.isinf(), lam(f))
            exits.masked_fill_(~dead, math.inf)  # a group that came back has not left

    def record(
        self,
        model: nn.Module,
        step: int,
        epoch: int,
        lam: float,
        terms: Sequence[Factorization],
        metrics: dict[str, Any],
    ) -> PathPoint:
        """Add a point with the model as it is now."""
        zeros = sum(int((w == 0).sum()) for f in terms for w in f.weights)
        total = sum(w.numel() for f in terms for w in f.weights)
        groups = {f.name: int((f.norms() > 0).sum()) for f in terms if f.grouped}
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        snapshot: Union[dict[str, Tensor], str] = state
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            snapshot = str(self.directory / f"point_{step}.pt")
            torch.save(state, snapshot)
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, Tensor)) and _scalar(v)}
        point = PathPoint(step, epoch, lam, total - zeros, zeros / max(total, 1), groups, scalars, snapshot)
        self.points.append(point)
        return point

    def state_dict(self) -> dict[str, Any]:
        return {"points": list(self.points), "exit_lam": {k: v.cpu() for k, v in self.exit_lam.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.points = Path(state.get("points", []))
        self.exit_lam = dict(state.get("exit_lam", {}))


def _scalar(value: Any) -> bool:
    return not isinstance(value, Tensor) or value.numel() == 1
