"""What SpredCallback shows in the trainer's loggers, and when: the place to add a metric or a view.

- every ``log_every_n_steps`` optimizer steps (and at the last epoch's end): the callback's
  :meth:`~lightning_spred.SpredCallback.compute_metrics`, ``spred/sparsity`` through ``LightningModule.log`` (progress
  bar, ``callback_metrics`` for monitors), the others straight to every logger, as ``LearningRateMonitor`` does;
- path points (``spred/path/*``), at the step of the trainer's own metrics;
- the settings, as the loggers' hyperparameters;
- with a ``WandbLogger``: histograms of ``log10|w|`` per layer, and at the end a per-layer sparsity chart, the path as
  one table with a plot of each metric against the groups in use, and the final figures in the run summary.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from lightning_spred.path import PathPoint, RegularizationPath
from lightning_spred.report import SparsityReport

__all__ = ["SpredLogging", "log_layer_views", "log_path", "write_summary"]


class SpredLogging:
    """The logging cadence of one callback: at most once per ``log_every_n_steps`` steps, steps and epoch ends alike.

    With short epochs (full-batch training) logging at every epoch end would cost more than the steps: epoch ends
    log only when ``log_every_n_steps`` steps have passed since the last log, and at the last epoch.
    """

    def __init__(self) -> None:
        self._last_log = self._last_views = -1

    def begin(self, trainer: Trainer) -> None:
        self._last_log = self._last_views = trainer.global_step - 1

    def after_step(
        self, trainer: Trainer, pl_module: LightningModule, metrics: Callable[[], dict[str, Tensor]]
    ) -> None:
        # computed only when Lightning itself writes to the loggers, to keep the other steps free of work and syncs
        if trainer._logger_connector.should_update_logs:
            self._last_log = trainer.global_step
            log_metrics(pl_module, metrics(), on_step=True)

    def at_epoch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        metrics: Callable[[], dict[str, Tensor]],
        named_weights: Callable[[], Iterable[tuple[str, Tensor]]],
        last: bool,
    ) -> None:
        every = max(trainer.log_every_n_steps, 1)
        if (trainer.global_step - self._last_log >= every or last) and self._last_log != trainer.global_step:
            self._last_log = trainer.global_step
            log_metrics(pl_module, metrics(), on_step=False)
        if trainer.global_step - self._last_views >= every or last:
            self._last_views = trainer.global_step
            for experiment in wandb_runs(trainer):
                log_layer_views(experiment, named_weights(), trainer.global_step)

    @staticmethod
    def hyperparameters(trainer: Trainer, values: Mapping[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(dict(values))

    @staticmethod
    def path_point(trainer: Trainer, point: PathPoint) -> None:
        values = {"spred/path/lam": point.lam, "spred/path/nonzeros": float(point.nonzeros)}
        values.update({f"spred/path/groups/{name}": float(count) for name, count in point.groups.items()})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=logging_step(trainer))

    @staticmethod
    def at_end(trainer: Trainer, report: SparsityReport, path: RegularizationPath) -> None:
        for experiment in wandb_runs(trainer):
            write_summary(experiment, report)
            log_path(experiment, path)


def logging_step(trainer: Trainer) -> int:
    """The step under which Lightning logs the metrics of the step that just ended (not ``global_step``, which has
    moved on already)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def log_metrics(pl_module: LightningModule, metrics: dict[str, Tensor], on_step: bool) -> None:
    """``spred/sparsity`` (when present) through ``LightningModule.log``, every other value to the loggers.

    ``self.log`` costs about a millisecond per key, more than a step of a small full-batch model, so only the
    headline figure goes through it (progress bar, ``callback_metrics`` for monitors).
    """
    metrics = dict(metrics)
    sparsity = metrics.pop("spred/sparsity", None)
    if sparsity is not None:
        pl_module.log("spred/sparsity", sparsity, prog_bar=True, on_step=on_step, on_epoch=not on_step)
    trainer = pl_module.trainer
    values = {key: float(value) for key, value in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=logging_step(trainer))


def wandb_runs(trainer: Trainer) -> list[Any]:
    """The W&B runs of the trainer's WandbLoggers, on rank zero only (other ranks have no real run)."""
    return [
        logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger) and trainer.is_global_zero
    ]


def log_layer_views(experiment: Any, named_weights: Iterable[tuple[str, Tensor]], step: int) -> None:
    """Log a histogram of ``log10 |w|`` of the nonzero weights of each layer.

    Args:
        experiment: a ``wandb`` run (``WandbLogger.experiment``).
        named_weights: the penalised weights by name.
        step: the trainer's global step, used as W&B's step.
    """
    import wandb

    views: dict[str, Any] = {}
    for name, weight in named_weights:
        magnitudes = weight.detach().abs().flatten()
        magnitudes = magnitudes[magnitudes > 0]
        if magnitudes.numel():
            views[f"spred/log10_abs_weight/{name}"] = wandb.Histogram(torch.log10(magnitudes).float().cpu().numpy())
    experiment.log({**views, "trainer/global_step": step})


def write_summary(experiment: Any, report: SparsityReport) -> None:
    """Log the per-layer sparsity bar chart once, and put the final sparsity, nonzeros and compression (total and
    per layer) in the run summary."""
    import wandb

    rows = [[layer.name, layer.sparsity] for layer in report.layers]
    table = wandb.Table(columns=["layer", "sparsity"], data=rows)
    experiment.log({"spred/layer_sparsity": wandb.plot.bar(table, "layer", "sparsity", title="Sparsity per layer")})
    for key, value in report.as_dict().items():
        experiment.summary[f"spred/final/{key}"] = value


def log_path(experiment: Any, path: RegularizationPath) -> None:
    """Log the recorded path once, as one table, with a line plot of each metric against the groups in use (or the
    nonzero weights when nothing is grouped): the accuracy-against-features curve of a path.

    Args:
        experiment: a ``wandb`` run (``WandbLogger.experiment``).
        path: the points recorded during fit (:attr:`SpredCallback.path`); nothing is logged when it is empty.
    """
    import wandb

    if not path:
        return
    rows = [{**point.as_dict(), "groups": sum(point.groups.values())} for point in path]
    columns = list(dict.fromkeys(key for row in rows for key in row))  # metrics logged later join at the end
    table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
    x = "groups" if path[0].groups else "nonzeros"
    # not under `spred/path/`, where the path's scalars are: a W&B key cannot be both a value and a parent
    views: dict[str, Any] = {"spred/path_table": table}
    metrics = {m for point in path for m in point.metrics if not m.startswith("spred/")}  # the user's metrics
    for metric in sorted(metrics):
        title = f"{metric} along the path"
        views[f"spred/path_plot/{metric}_vs_{x}"] = wandb.plot.line(table, x, metric, title=title)
    experiment.log(views)
