"""Stability selection: one ranking from many paths, each run on a random subsample of the training data.

On a few dozen samples one path's ranking is noisy: which features leave last depends on which samples were seen.
Stability selection (Meinshausen & Bühlmann 2010) runs the selection on many subsamples (half of the samples each)
and keeps the features chosen most often. Here each subsample runs one warm-started spred path (a fit with a rising
``lam``, see :mod:`lightning_spred.path`), and a feature's score is how often it is among the last ``k`` to leave,
ties broken by its mean position.

The fitting stays the user's: :func:`stability_selection` draws the subsamples and calls ``fit(rows)``, which trains
on those rows (any LightningModule, any Trainer) and returns that path's :class:`FeatureSelection` of every feature
(``callback.selected_features(k=n_features)``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from lightning_spred.features import FeatureSelection

__all__ = ["aggregate_rankings", "stability_selection"]


def aggregate_rankings(
    rankings: Sequence[Sequence[int]], n_features: int, k: int, names: Optional[Sequence[str]] = None
) -> FeatureSelection:
    """The ``k`` features most often among the top ``k`` of the rankings (ties: by mean position).

    Args:
        rankings: one ranking per subsample, most important first (every feature, or at least the top ``k``).
        n_features: the number of features.
        k: how many to select.
        names: one name per feature.

    Raises:
        ValueError: no rankings, or ``k`` is not between 1 and ``n_features``.

    Example:
        >>> selection = aggregate_rankings([[2, 0, 1], [2, 1, 0], [0, 2, 1]], n_features=3, k=1)
        >>> selection.sorted_indices, selection.frequency
        ((2,), (0.6666666666666666,))
    """
    if not rankings:
        raise ValueError("Give at least one ranking (one path per subsample).")
    if not 1 <= k <= n_features:
        raise ValueError(f"`k` must be between 1 and the number of features ({n_features}), got {k}.")
    counts = np.zeros(n_features)
    positions = np.full((len(rankings), n_features), float(n_features))  # unranked features come last
    for row, ranking in enumerate(rankings):
        order = np.asarray(ranking, dtype=np.int64)
        counts[order[:k]] += 1
        positions[row, order] = np.arange(len(order))
    frequency = counts / len(rankings)
    mean_position = positions.mean(axis=0)
    chosen = np.lexsort((mean_position, -frequency))[:k]
    chosen.sort()
    return FeatureSelection(
        sorted_indices=tuple(int(i) for i in chosen),
        norms=tuple(float(-mean_position[i]) for i in chosen),  # ranks like a norm: larger is more important
        sorted_names=tuple(names[i] for i in chosen) if names is not None else None,
        n_features=n_features,
        frequency=tuple(float(frequency[i]) for i in chosen),
    )


def stability_selection(
    fit: Callable[[np.ndarray], FeatureSelection],
    n_samples: int,
    k: int,
    subsamples: int = 20,
    fraction: float = 0.5,
    stratify: Optional[np.ndarray] = None,
    seed: int = 0,
    names: Optional[Sequence[str]] = None,
) -> FeatureSelection:
    """Run ``fit`` on ``subsamples`` random subsamples of the rows and aggregate their rankings.

    Args:
        fit: trains on the given row indices and returns that path's selection of every feature (its
            :meth:`FeatureSelection.ranked_indices` is the ranking).
        n_samples: the number of rows.
        k: how many features to select.
        subsamples: how many paths.
        fraction: the share of the rows in each subsample (half, as Meinshausen & Bühlmann).
        stratify: class labels: each subsample keeps the classes' proportions.
        seed: the subsamples' random seed.
        names: one name per feature.

    Example:
        >>> def fit(rows):  # a stand-in for a path: the features ranked by their first row's values
        ...     x = np.array([[3.0, 1.0, 2.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [3.0, 1.0, 2.0]])[rows]
        ...     return FeatureSelection(sorted_indices=(0, 1, 2), norms=tuple(float(v) for v in x[0]), n_features=3)
        >>> stability_selection(fit, n_samples=4, k=1, subsamples=5).sorted_indices
        (0,)
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction}.")
    if subsamples < 1:
        raise ValueError(f"`subsamples` must be >= 1, got {subsamples}.")
    rng = np.random.default_rng(seed)
    rankings, n_features = [], 0
    for _ in range(subsamples):
        rows = _subsample(rng, n_samples, fraction, stratify)
        selection = fit(rows)
        n_features = selection.n_features
        rankings.append(selection.ranked_indices())
    return aggregate_rankings(rankings, n_features, k, names)


def _subsample(rng: np.random.Generator, n: int, fraction: float, stratify: Optional[np.ndarray]) -> np.ndarray:
    if stratify is None:
        return np.sort(rng.choice(n, size=max(1, int(round(fraction * n))), replace=False))
    rows = []
    for label in np.unique(stratify):
        members = np.flatnonzero(stratify == label)
        rows.append(rng.choice(members, size=max(1, int(round(fraction * len(members)))), replace=False))
    return np.sort(np.concatenate(rows))
