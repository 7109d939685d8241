"""Per-layer sparsity counts, as data and as a printed table."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from torch import Tensor

from lightning_spred.functional import count_zeros

__all__ = ["LayerSparsity", "SparsityReport", "sparsity_report"]


@dataclass(frozen=True)
class LayerSparsity:
    """Counts for one weight (or for a total).

    Attributes:
        name: the weight's name in ``named_parameters()``, or ``"total"``.
        parameters: number of entries.
        nonzeros: number of entries that are not exactly zero.
    """

    name: str
    parameters: int
    nonzeros: int

    @property
    def sparsity(self) -> float:
        """Fraction of zero entries, in ``[0, 1]``."""
        return 1.0 - self.nonzeros / self.parameters if self.parameters else 0.0

    @property
    def compression(self) -> float:
        """``parameters / nonzeros`` (infinite when every entry is zero)."""
        return self.parameters / self.nonzeros if self.nonzeros else math.inf


@dataclass(frozen=True)
class SparsityReport:
    """The sparsity of every penalised weight, and the total over them.

    Example:
        >>> import torch
        >>> report = sparsity_report([("a", torch.tensor([0.0, 1.0])), ("b", torch.zeros(2))])
        >>> report.total.sparsity, report.layers[0].compression
        (0.75, 2.0)
        >>> print(report)  # doctest: +NORMALIZE_WHITESPACE
        layer  parameters  nonzeros  sparsity  compression
        a               2         1    50.00%         2.0x
        b               2         0   100.00%          infx
        total           4         1    75.00%         4.0x
    """

    layers: tuple[LayerSparsity, ...]

    @property
    def total(self) -> LayerSparsity:
        return LayerSparsity(
            "total", sum(layer.parameters for layer in self.layers), sum(layer.nonzeros for layer in self.layers)
        )

    def as_dict(self) -> dict[str, float]:
        """Flat numbers for loggers and run summaries: ``sparsity/<layer>``, totals and compression."""
        values: dict[str, float] = {f"sparsity/{layer.name}": layer.sparsity for layer in self.layers}
        total = self.total
        values.update(sparsity=total.sparsity, nonzeros=total.nonzeros, parameters=total.parameters)
        values["compression"] = total.compression
        return values

    def __str__(self) -> str:
        rows = (*self.layers, self.total)
        width = max(len("layer"), *(len(row.name) for row in rows))
        lines = [f"{'layer':<{width}}  parameters  nonzeros  sparsity  compression"]
        for row in rows:
            lines.append(
                f"{row.name:<{width}}  {row.parameters:>10,}  {row.nonzeros:>8,}  {row.sparsity:>8.2%}"
                f"  {row.compression:>10.1f}x"
            )
        return "\n".join(lines)


def sparsity_report(named_weights: Iterable[tuple[str, Tensor]], threshold: float = 0.0) -> SparsityReport:
    """Count the entries of each weight with magnitude ``> threshold``."""
    layers = [
        LayerSparsity(name, weight.numel(), weight.numel() - int(count_zeros(weight, threshold)))
        for name, weight in named_weights
    ]
    return SparsityReport(tuple(layers))
