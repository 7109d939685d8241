"""What SpredCallback shows in Weights & Biases beyond the scalar metrics every logger gets."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from lightning_spred.report import SparsityReport

__all__ = ["log_layer_views", "write_summary"]


def log_layer_views(
    experiment: Any, report: SparsityReport, named_weights: Iterable[tuple[str, Tensor]], step: int
) -> None:
    """Log a per-layer sparsity bar chart and a histogram of ``log10 |w|`` of the nonzero weights per layer.

    Args:
        experiment: a ``wandb`` run (``WandbLogger.experiment``).
        report: the current counts.
        named_weights: the penalised weights by name.
        step: the trainer's global step, used as W&B's step.
    """
    import wandb

    table = wandb.Table(columns=["layer", "sparsity"], data=[[layer.name, layer.sparsity] for layer in report.layers])
    views: dict[str, Any] = {
        "spred/layer_sparsity": wandb.plot.bar(table, "layer", "sparsity", title="Sparsity per layer")
    }
    for name, weight in named_weights:
        magnitudes = weight.detach().abs().flatten()
        magnitudes = magnitudes[magnitudes > 0]
        if magnitudes.numel():
            views[f"spred/log10_abs_weight/{name}"] = wandb.Histogram(torch.log10(magnitudes).float().cpu().numpy())
    experiment.log({**views, "trainer/global_step": step})


def write_summary(experiment: Any, report: SparsityReport) -> None:
    """Put the final sparsity, nonzeros and compression (total and per layer) in the run summary."""
    for key, value in report.as_dict().items():
        experiment.summary[f"spred/final/{key}"] = value
