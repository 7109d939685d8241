"""What SpredCallback shows in Weights & Biases beyond the scalar metrics every logger gets."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from lightning_spred.path import Path
from lightning_spred.report import SparsityReport

__all__ = ["log_layer_views", "log_path", "write_summary"]


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


def log_path(experiment: Any, path: Path) -> None:
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
