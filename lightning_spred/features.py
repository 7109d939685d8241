"""Read the selected groups (input features, neurons, channels) off a group-sparse weight.

:class:`FeatureSelection` follows scikit-learn's selector conventions (``get_support`` returns a NumPy mask,
``transform``, ``get_feature_names_out``, ``fit`` is a no-op), so a fitted selection drops into a ``Pipeline``
in front of any scikit-learn model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_spred.functional import group_norms

__all__ = ["FeatureSelection", "rank_groups", "selected_features"]


@dataclass
class FeatureSelection:
    """The selected groups of a weight, a fitted scikit-learn-style selector.

    The selected groups are held in index order (``sorted_indices``); :meth:`ranked_indices` and
    :meth:`ranked_names` give them most important first.

    Attributes:
        sorted_indices: positions of the selected groups along the group dimension, ascending.
        norms: the Euclidean norm of each selected group, aligned with ``sorted_indices``.
        sorted_names: the selected groups' names (aligned with ``sorted_indices``), when names were given.
        n_features: the number of groups the weight has.
        exit_lam: for each selected group, the ``lam`` at which it left the path (``inf``: still in use at the end),
            when a path was run; the later a group leaves, the more it matters.
        exit_step: for each selected group, the step at which it left the path (``inf``: still in use): among
            groups that left at the same ``lam`` (a flat ``lam``), the later step ranks first.
        frequency: for a stability selection (:mod:`lightning_spred.stability`), how often each selected group was
            among the top ``k`` of the subsamples' paths; it ranks first.

    Example:
        >>> selection = FeatureSelection(sorted_indices=(0, 2), norms=(1.0, 2.0), n_features=3)
        >>> selection.get_support()
        array([ True, False,  True])
        >>> selection.ranked_indices()
        [2, 0]
    """

    sorted_indices: tuple[int, ...]
    norms: tuple[float, ...]
    sorted_names: Optional[tuple[str, ...]] = None
    n_features: int = 0
    exit_lam: Optional[tuple[float, ...]] = None
    exit_step: Optional[tuple[float, ...]] = None
    frequency: Optional[tuple[float, ...]] = None

    def __len__(self) -> int:
        return len(self.sorted_indices)

    def ranked_indices(self) -> list[int]:
        """The selected indices, most important first: the most frequent (stability selection), the last to leave the
        path (by ``lam``, then step), then by norm.

        Example:
            >>> selection = FeatureSelection(sorted_indices=(0, 2, 3), norms=(1.0, 2.0, 0.5), exit_lam=(0.3, 0.1, 0.3))
            >>> selection.ranked_indices()
            [0, 3, 2]
        """
        exits = torch.tensor(self.exit_lam) if self.exit_lam is not None else None
        steps = torch.tensor(self.exit_step) if self.exit_step is not None else None
        order = rank_groups(torch.tensor(self.norms), exits, steps)
        if self.frequency is not None:
            order = order[torch.argsort(torch.tensor(self.frequency)[order], descending=True, stable=True)]
        return [self.sorted_indices[i] for i in order.tolist()]

    def ranked_names(self) -> list[str]:
        """The selected groups' names (or indices as strings), most important first."""
        labels = self.sorted_names or tuple(str(i) for i in self.sorted_indices)
        position = {index: i for i, index in enumerate(self.sorted_indices)}
        return [labels[position[i]] for i in self.ranked_indices()]

    # scikit-learn's selector interface -------------------------------------------------------------------------
    def fit(self, x: Any = None, y: Any = None) -> FeatureSelection:
        """Nothing to fit: the selection was made by the training run (so that it fits in a ``Pipeline``)."""
        return self

    def get_support(self, indices: bool = False) -> np.ndarray:
        """A NumPy boolean mask over all groups (``True`` where selected), or the selected indices, ascending."""
        if indices:
            return np.asarray(self.sorted_indices, dtype=np.int64)
        mask = np.zeros(self.n_features, dtype=bool)
        mask[list(self.sorted_indices)] = True
        return mask

    def transform(self, x: Any) -> Any:
        """The selected columns of ``x`` (a NumPy array, a tensor or a DataFrame with one column per group).

        Example:
            >>> FeatureSelection(sorted_indices=(0, 2), norms=(1.0, 2.0), n_features=3).transform(np.eye(3))
            array([[1., 0.],
                   [0., 0.],
                   [0., 1.]])
        """
        if x.shape[-1] != self.n_features:
            raise ValueError(f"`x` has {x.shape[-1]} columns, but the selection was made over {self.n_features}.")
        if hasattr(x, "iloc"):
            return x.iloc[:, list(self.sorted_indices)]
        return x[..., list(self.sorted_indices)]

    def fit_transform(self, x: Any, y: Any = None) -> Any:
        return self.transform(x)

    def get_feature_names_out(self, input_features: Optional[Sequence[str]] = None) -> np.ndarray:
        """The selected names: from ``input_features``, else the names given to the selection, else ``x<i>``."""
        if input_features is not None:
            return np.asarray([input_features[i] for i in self.sorted_indices], dtype=object)
        if self.sorted_names is not None:
            return np.asarray(self.sorted_names, dtype=object)
        return np.asarray([f"x{i}" for i in self.sorted_indices], dtype=object)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def set_params(self, **params: Any) -> FeatureSelection:
        raise TypeError("A FeatureSelection is fixed by the run that made it: make a new one instead.")


def selected_features(
    weight: Optional[Tensor],
    dim: int = 1,
    names: Optional[Sequence[str]] = None,
    k: Optional[int] = None,
    exit_lam: Optional[Tensor] = None,
    norms: Optional[Tensor] = None,
    exit_step: Optional[Tensor] = None,
) -> FeatureSelection:
    """The groups along ``dim`` of ``weight`` in use (``dim=1``: input features of a ``Linear``).

    Args:
        weight: a weight, for example the first ``Linear``'s after fitting with ``groups={...: "input"}`` (may be
            ``None`` when ``norms`` are given).
        dim: the group dimension.
        names: one name per index of ``dim`` (for example gene names).
        k: return exactly ``k`` groups: the last ``k`` to leave the path when ``exit_lam`` is given (ties by the
            exit step, then groups still in use by norm), else the ``k`` largest norms.
        exit_lam: for each group, the ``lam`` at which it left the path (``inf`` if it is still in use).
        norms: the groups' norms, when a group spans more tensors than ``weight`` (a channel group).
        exit_step: for each group, the step at which it left the path (``inf`` if it is still in use).

    Raises:
        ValueError: ``names`` does not have one entry per group, or ``k`` is larger than the number of groups.

    Example:
        >>> w = torch.tensor([[0.0, 3.0, 0.0], [0.0, 4.0, 1.0]])
        >>> selected_features(w, names=["a", "b", "c"]).sorted_names
        ('b', 'c')
        >>> selected_features(w, k=1).sorted_indices
        (1,)
    """
    if norms is None:
        if weight is None:
            raise ValueError("Give the weight, or the groups' `norms`.")
        norms = group_norms(weight.detach(), dim)
    norms = norms.float().cpu()
    count = len(norms)
    if names is not None and len(names) != count:
        raise ValueError(f"Got {len(names)} names for {count} groups along dim {dim}: give one name per group.")
    exits = exit_lam.float().cpu() if exit_lam is not None else None
    steps = exit_step.float().cpu() if exit_step is not None else None
    if k is None:
        chosen = norms.nonzero().flatten().tolist()
    else:
        if not 0 <= k <= count:
            raise ValueError(f"`k` must be between 0 and the number of groups ({count}), got {k}.")
        chosen = sorted(rank_groups(norms, exits, steps)[:k].tolist())
    return FeatureSelection(
        sorted_indices=tuple(chosen),
        norms=tuple(float(norms[i]) for i in chosen),
        sorted_names=tuple(names[i] for i in chosen) if names is not None else None,
        n_features=count,
        exit_lam=tuple(float(exits[i]) for i in chosen) if exits is not None else None,
        exit_step=tuple(float(steps[i]) for i in chosen) if steps is not None else None,
    )


def rank_groups(norms: Tensor, exit_lam: Optional[Tensor], exit_step: Optional[Tensor] = None) -> Tensor:
    """Group positions, most important first: the last to leave the path first (by ``exit_lam``, then by
    ``exit_step``), groups still in use by norm.

    Example:
        >>> rank_groups(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0.1, 0.1, float("inf")]))
        tensor([2, 1, 0])
        >>> rank_groups(torch.zeros(3), torch.tensor([0.1, 0.1, 0.1]), torch.tensor([5.0, 9.0, 7.0]))
        tensor([1, 2, 0])
    """
    order = torch.argsort(norms, descending=True, stable=True)
    if exit_step is not None:
        order = order[torch.argsort(exit_step[order], descending=True, stable=True)]
    if exit_lam is not None:
        order = order[torch.argsort(exit_lam[order], descending=True, stable=True)]
    return order
