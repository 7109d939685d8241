"""The regularisation path inside one fit: points along a rising ``lam``, and when each group switched off.

While ``lam`` rises (a schedule or a target), every step warm-starts from the previous one, as glmnet and LassoNet
do between the points of their paths. :class:`PathRecorder` keeps, for every grouped weight, the step and the ``lam``
at which each group last became zero (LassoNet's feature importance: the later a feature leaves, the more it
matters) and, when asked, points with the counts, the trainer's metrics and a snapshot of the sparse model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_spred.census import HostCensus
from lightning_spred.factorization import Factorization

__all__ = ["PathPoint", "PathRecorder", "RegularizationPath"]


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
        metrics: the trainer's metrics of that step (``trainer.callback_metrics``, as floats); validation metrics
            only when validation ran at that step.
        snapshot: the model's ``state_dict`` (a CPU copy), or the file it was saved to.
        dead_layers: penalised weights that were entirely zero: the model had collapsed there.
        at_limit: ``lam`` was held at the optimizer's stable limit (the path did not rise as asked beyond it).
    """

    step: int
    epoch: int
    lam: float
    nonzeros: int
    sparsity: float
    groups: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    snapshot: Union[dict[str, Tensor], str, None] = field(default=None, repr=False)
    dead_layers: tuple[str, ...] = ()
    at_limit: bool = False

    @property
    def collapsed(self) -> bool:
        return bool(self.dead_layers)

    def as_dict(self) -> dict[str, Any]:
        """A flat row for tables: step, epoch, lam, nonzeros, sparsity, ``groups/<name>``, flags, metrics."""
        row: dict[str, Any] = {"step": self.step, "epoch": self.epoch, "lam": self.lam, "nonzeros": self.nonzeros}
        row["sparsity"] = self.sparsity
        row.update({f"groups/{name}": count for name, count in self.groups.items()})
        row.update(collapsed=self.collapsed, at_limit=self.at_limit)
        row.update(self.metrics)
        return row


class RegularizationPath(list):
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
        allow_collapsed: bool = False,
    ) -> PathPoint:
        """The point with the best ``monitor`` among those within the constraints.

        Points where a penalised weight was entirely zero (:attr:`PathPoint.collapsed`) are left out unless
        ``allow_collapsed``: such a model's layer outputs a constant.

        Args:
            monitor: a metric the trainer logged (for example ``"val_loss"``).
            mode: whether smaller or larger is better.
            max_nonzeros: only points with at most this many nonzero weights.
            max_groups: only points with at most this many groups in use (summed over grouped weights).
            allow_collapsed: also consider collapsed points.

        Raises:
            ValueError: no point has ``monitor`` and meets the constraints.
        """
        with_metric = [p for p in self if monitor in p.metrics]
        candidates = [
            p
            for p in with_metric
            if (max_nonzeros is None or p.nonzeros <= max_nonzeros)
            and (max_groups is None or sum(p.groups.values()) <= max_groups)
            and (allow_collapsed or not p.collapsed)
        ]
        if not candidates:
            if not with_metric:
                logged = sorted({k for p in self for k in p.metrics})
                raise ValueError(
                    f"No path point has `{monitor}`; metrics on the path: {logged}. Log it during validation"
                    " (`record_path=True` records a point at every validation end)."
                )
            fewest_nonzeros = min(p.nonzeros for p in with_metric)
            fewest_groups = min(sum(p.groups.values()) for p in with_metric)
            collapsed = sum(p.collapsed for p in with_metric)
            raise ValueError(
                f"No path point with `{monitor}` meets max_nonzeros={max_nonzeros}, max_groups={max_groups}: the"
                f" smallest on the path are {fewest_nonzeros} nonzeros and {fewest_groups} groups"
                + (f" ({collapsed} collapsed points left out: `allow_collapsed=True`)" if collapsed else "")
                + ". Loosen the constraint, or run the path further."
            )
        sign = 1 if mode == "min" else -1
        return min(candidates, key=lambda p: sign * p.metrics[monitor])


class PathRecorder:
    """Tracks when each group switches off, and records path points on request.

    Args:
        directory: where snapshots are saved (``point_<step>.pt``); ``None`` keeps them in memory on the CPU.
    """

    def __init__(self, directory: Optional[Union[str, Path]] = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.points = RegularizationPath()
        #: per grouped weight: the ``lam`` and the step at which each group left (``inf`` while in use)
        self.exit_lam: dict[str, Tensor] = {}
        self.exit_step: dict[str, Tensor] = {}
        self._validation: tuple[int, set[str]] = (-1, set())  # the step of the last validation, and its metrics
        self._before: dict[str, Any] = {}

    def reset(self) -> None:
        self.points = RegularizationPath()
        self.exit_lam, self.exit_step = {}, {}
        self._validation, self._before = (-1, set()), {}

    def validation_starts(self, metrics: Mapping[str, Any]) -> None:
        self._before = dict(metrics)

    def validated(self, step: int, metrics: Mapping[str, Any]) -> None:
        """After a validation: the metrics it logged (new or changed ones) belong to ``step``, and join the point
        recorded after that step, if any (validation runs after the step's last hook)."""
        changed = {k for k, v in metrics.items() if k not in self._before or self._before[k] is not v}
        self._validation = (step, self._validation[1] | changed)
        if self.points and self.points[-1].step == step:
            point = self.points[-1]
            scalars = _scalars({k: v for k, v in metrics.items() if k in changed})
            self.points[-1] = replace(point, metrics={**point.metrics, **scalars})

    def current_metrics(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """The trainer's metrics that belong to ``step``: validation metrics only if validation ran at that step."""
        validated_at, keys = self._validation
        return {k: v for k, v in metrics.items() if step == validated_at or k not in keys}

    def check_directory(self) -> None:
        """Refuse a ``directory`` that cannot hold snapshots, before training.

        Raises:
            NotADirectoryError: it exists and is a file.
        """
        if self.directory is not None and self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"`path_dir={str(self.directory)!r}` is a file: give a directory for snapshots.")

    @torch.no_grad()
    def track(self, terms: Sequence[Factorization], step: int) -> None:
        """After a step: a group that is zero now and was not before left at this step, at its term's ``lam``."""
        for f in terms:
            if not f.grouped:
                continue
            dead = f.norms() == 0
            exits = self.exit_lam.get(f.name)
            if exits is None or exits.shape != dead.shape:
                exits = self.exit_lam[f.name] = torch.full(dead.shape, math.inf, device=dead.device)
                self.exit_step[f.name] = torch.full(dead.shape, math.inf, device=dead.device)
            steps = self.exit_step[f.name]
            leaving = dead & exits.isinf()
            exits.masked_fill_(leaving, f.lam)
            steps.masked_fill_(leaving, float(step))
            exits.masked_fill_(~dead, math.inf)  # a group that came back has not left
            steps.masked_fill_(~dead, math.inf)

    def record(
        self,
        model: nn.Module,
        step: int,
        epoch: int,
        lam: float,
        census: HostCensus,
        metrics: dict[str, Any],
        at_limit: bool = False,
    ) -> PathPoint:
        """Add a point with the model as it is now (a point of the same step is replaced)."""
        groups = {name: n for name, n, grouped in zip(census.terms, census.in_use, census.grouped) if grouped}
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        snapshot: Union[dict[str, Tensor], str] = state
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            snapshot = str(self.directory / f"point_{step}.pt")
            torch.save(state, snapshot)
        scalars = _scalars(metrics)
        point = PathPoint(
            step,
            epoch,
            lam,
            census.entries - census.zeros,
            census.sparsity,
            groups,
            scalars,
            snapshot,
            tuple(census.dead),
            at_limit,
        )
        if self.points and self.points[-1].step == step:
            self.points[-1] = point
        else:
            self.points.append(point)
        return point

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers, strings and tensors: loadable with ``torch.load(weights_only=True)``."""
        points = [{f.name: getattr(p, f.name) for f in fields(p)} for p in self.points]
        for point in points:
            point["dead_layers"] = list(point["dead_layers"])
        return {
            "points": points,
            "exit_lam": {k: v.cpu() for k, v in self.exit_lam.items()},
            "exit_step": {k: v.cpu() for k, v in self.exit_step.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        points = [
            PathPoint(**{**p, "dead_layers": tuple(p.get("dead_layers", ()))}) if isinstance(p, dict) else p
            for p in state.get("points", [])
        ]
        self.points = RegularizationPath(points)
        self.exit_lam = dict(state.get("exit_lam", {}))
        self.exit_step = dict(state.get("exit_step", {}))


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The one-number metrics, as floats."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, Tensor)) and (not isinstance(v, Tensor) or v.numel() == 1)
    }
