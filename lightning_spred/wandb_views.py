"""What SpredCallback shows in Weights & Biases beyond the scalar metrics every logger gets."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from lightning_spred.report import SparsityReport

__all__ = ["log_layer_views", "write_summary"]


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
