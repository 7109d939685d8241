"""Read the selected groups (input features, neurons, channels) off a group-sparse weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from lightning_spred.functional import group_norms

__all__ = ["FeatureSelection", "rank_groups", "selected_features"]


@dataclass(frozen=True)
class FeatureSelection:
    """The selected groups of a weight, usable like scikit-learn's ``SelectFromModel``.

    Attributes:
        indices: positions of the selected groups along the group dimension, ascending.
        norms: the Euclidean norm of each selected group, aligned with ``indices``.
        names: the selected groups' names, when names were given.
        n_features: the number of groups the weight has.
        exit_lam: for each selected group, the ``lam`` at which it left the path (``inf``: still in use at the end),
            when a path was run; the later a group leaves, the more it matters.
    """

    indices: tuple[int, ...]
    norms: tuple[float, ...]
    names: Optional[tuple[str, ...]] = None
    n_features: int = 0
    exit_lam: Optional[tuple[float, ...]] = None

    def __len__(self) -> int:
        return len(self.indices)

    def ranked(self) -> list[tuple[str, float]]:
        """``(name or index, norm)`` pairs, most important first (see :meth:`order`)."""
        labels = self.names or tuple(str(i) for i in self.indices)
        position = {index: i for i, index in enumerate(self.indices)}
        return [(labels[position[i]], self.norms[position[i]]) for i in self.order()]

    def order(self) -> list[int]:
        """The selected indices, most important first: the last to leave the path (when there was one), then by norm.

        Example:
            >>> FeatureSelection(indices=(0, 2, 3), norms=(1.0, 2.0, 0.5), exit_lam=(0.3, 0.1, 0.3)).order()
            [0, 3, 2]
        """
        exits = torch.tensor(self.exit_lam) if self.exit_lam is not None else None
        return [self.indices[i] for i in rank_groups(torch.tensor(self.norms), exits).tolist()]

    def get_support(self, indices: bool = False) -> Any:
        """A boolean mask over all groups (``True`` where selected), or the selected indices.

        Example:
            >>> FeatureSelection(indices=(0, 2), norms=(1.0, 2.0), n_features=3).get_support()
            tensor([ True, False,  True])
        """
        if indices:
            return torch.tensor(self.indices, dtype=torch.long)
        mask = torch.zeros(self.n_features, dtype=torch.bool)
        mask[list(self.indices)] = True
        return mask

    def transform(self, x: Any) -> Any:
        """The selected columns of ``x`` (a NumPy array or a tensor with one column per group).

        Example:
            >>> FeatureSelection(indices=(0, 2), norms=(1.0, 2.0), n_features=3).transform(torch.eye(3))
            tensor([[1., 0.],
                    [0., 0.],
                    [0., 1.]])
        """
        if x.shape[-1] != self.n_features:
            raise ValueError(f"`x` has {x.shape[-1]} columns, but the selection was made over {self.n_features}.")
        return x[..., list(self.indices)]


def selected_features(
    weight: Tensor,
    dim: int = 1,
    names: Optional[Sequence[str]] = None,
    k: Optional[int] = None,
    exit_lam: Optional[Tensor] = None,
    norms: Optional[Tensor] = None,
) -> FeatureSelection:
    """The groups along ``dim`` of ``weight`` in use (``dim=1``: input features of a ``Linear``).

    Args:
        weight: a weight, for example the first ``Linear``'s after fitting with ``groups={...: "input"}``.
        dim: the group dimension.
        names: one name per index of ``dim`` (for example gene names).
        k: return exactly ``k`` groups: the last ``k`` to leave the path when ``exit_lam`` is given (ties, and
            groups still in use, by norm), else the ``k`` largest norms.
        exit_lam: for each group, the ``lam`` at which it left the path (``inf`` if it is still in use).
        norms: the groups' norms, when a group spans more tensors than ``weight`` (a channel group).

    Raises:
        ValueError: ``names`` does not have one entry per group, or ``k`` is larger than the number of groups.

    Example:
        >>> w = torch.tensor([[0.0, 3.0, 0.0], [0.0, 4.0, 1.0]])
        >>> selected_features(w, names=["a", "b", "c"])
        FeatureSelection(indices=(1, 2), norms=(5.0, 1.0), names=('b', 'c'), n_features=3, exit_lam=None)
        >>> selected_features(w, k=1).indices
        (1,)
    """
    norms = (group_norms(weight.detach(), dim) if norms is None else norms).float().cpu()
    count = len(norms)
    if names is not None and len(names) != count:
        raise ValueError(f"Got {len(names)} names for {count} groups along dim {dim}: give one name per group.")
    exits = exit_lam.float().cpu() if exit_lam is not None else None
    if k is None:
        chosen = norms.nonzero().flatten().tolist()
    else:
        if not 0 <= k <= count:
            raise ValueError(f"`k` must be between 0 and the number of groups ({count}), got {k}.")
        chosen = sorted(rank_groups(norms, exits)[:k].tolist())
    return FeatureSelection(
        indices=tuple(chosen),
        norms=tuple(float(norms[i]) for i in chosen),
        names=tuple(names[i] for i in chosen) if names is not None else None,
        n_features=count,
        exit_lam=tuple(float(exits[i]) for i in chosen) if exits is not None else None,
    )


def rank_groups(norms: Tensor, exit_lam: Optional[Tensor]) -> Tensor:
    """Group positions, most important first: the last to leave the path first (when ``exit_lam`` is given), ties
    and groups still in use by norm.

    Example:
        >>> rank_groups(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0.1, 0.1, float("inf")]))
        tensor([2, 1, 0])
    """
    order = torch.argsort(norms, descending=True, stable=True)
    if exit_lam is not None:
        order = order[torch.argsort(exit_lam[order], descending=True, stable=True)]
    return order
