"""Read the selected groups (input features, neurons, channels) off a group-sparse weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor

from lightning_spred.functional import group_norms

__all__ = ["FeatureSelection", "selected_features"]


@dataclass(frozen=True)
class FeatureSelection:
    """The groups of a weight that are not zero.

    Attributes:
        indices: positions of the selected groups along the group dimension, ascending.
        norms: the Euclidean norm of each selected group, aligned with ``indices``.
        names: the selected groups' names, when names were given.
    """

    indices: tuple[int, ...]
    norms: tuple[float, ...]
    names: Optional[tuple[str, ...]] = None

    def __len__(self) -> int:
        return len(self.indices)

    def ranked(self) -> list[tuple[str, float]]:
        """``(name or index, norm)`` pairs, largest norm first."""
        labels = self.names or tuple(str(i) for i in self.indices)
        return sorted(zip(labels, self.norms), key=lambda pair: -pair[1])


def selected_features(weight: Tensor, dim: int = 1, names: Optional[Sequence[str]] = None) -> FeatureSelection:
    """The groups along ``dim`` of ``weight`` with a nonzero norm (``dim=1``: input features of a ``Linear``).

    Args:
        weight: a weight, for example the first ``Linear``'s after fitting with ``groups={...: "input"}``.
        dim: the group dimension.
        names: one name per index of ``dim`` (for example gene names).

    Raises:
        ValueError: ``names`` does not have one entry per group.

    Example:
        >>> import torch
        >>> w = torch.tensor([[0.0, 3.0, 0.0], [0.0, 4.0, 1.0]])
        >>> selected_features(w, names=["a", "b", "c"])
        FeatureSelection(indices=(1, 2), norms=(5.0, 1.0), names=('b', 'c'))
    """
    norms = group_norms(weight.detach(), dim)
    if names is not None and len(names) != len(norms):
        raise ValueError(f"Got {len(names)} names for {len(norms)} groups along dim {dim}: give one name per group.")
    indices = tuple(int(i) for i in norms.nonzero().flatten())
    return FeatureSelection(
        indices=indices,
        norms=tuple(float(norms[i]) for i in indices),
        names=tuple(names[i] for i in indices) if names is not None else None,
    )
