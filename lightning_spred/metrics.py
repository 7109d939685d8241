"""A torchmetrics ``Metric`` for the sparsity of any tensors, layers or models, synchronised across processes."""

from __future__ import annotations

from typing import Any, Iterable, Union

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_spred.functional import count_zeros

__all__ = ["Sparsity"]

Weights = Union[Tensor, nn.Module, Iterable[Tensor]]


class Sparsity(Metric):
    """Fraction of entries with magnitude ``<= threshold`` over everything passed to ``update``.

    ``update`` takes a tensor, an iterable of tensors, or a module (all its parameters). Counts are summed
    across processes under DDP, so ``compute`` gives the sparsity of the union of every rank's tensors.

    Args:
        threshold: entries with ``|x| <= threshold`` count as zero.
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    Example:
        >>> metric = Sparsity()
        >>> metric.update(torch.tensor([0.0, 1.0, 0.0, 2.0]))
        >>> metric.compute()
        tensor(0.5000)
        >>> layer = nn.Linear(4, 2, bias=False)
        >>> _ = nn.init.zeros_(layer.weight)
        >>> metric.update(layer)
        >>> metric.compute()
        tensor(0.8333)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not threshold >= 0:
            raise ValueError(f"`threshold` must be a number >= 0, got {threshold}.")
        self.threshold = float(threshold)
        self.add_state("zeros", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, weights: Weights) -> None:
        tensors = (
            weights.parameters()
            if isinstance(weights, nn.Module)
            else [weights]
            if isinstance(weights, Tensor)
            else weights
        )
        for tensor in tensors:
            self.zeros += count_zeros(tensor, self.threshold).to(self.zeros.device)
            self.total += tensor.numel()

    def compute(self) -> Tensor:
        return self.zeros.float() / self.total if self.total > 0 else torch.zeros((), device=self.zeros.device)
