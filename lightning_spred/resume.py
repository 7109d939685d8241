"""Resuming the factors from a checkpoint: the terms' states are applied when each term starts.

Lightning restores a callback's state before the optimizers exist and before the first step, so a term cannot take
its factors back then: :class:`SavedTerms` keeps them and hands each term its own at the term's first optimizer
step. A checkpoint written before a term ever trained (a frozen layer) still holds that term's saved state.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from lightning.pytorch.utilities import rank_zero_warn

from lightning_spred.factorization import Factorization

__all__ = ["SavedTerms"]


class SavedTerms:
    """The penalty terms' states of a checkpoint, until each term starts."""

    def __init__(self) -> None:
        self._saved: dict[str, dict[str, Any]] = {}

    def __bool__(self) -> bool:
        return bool(self._saved)

    def load(self, states: dict[str, dict[str, Any]]) -> None:
        self._saved = dict(states)

    def check(self, terms: Sequence[Factorization]) -> None:
        """Refuse a checkpoint whose factors do not fit the weights; say which terms were added or dropped.

        Raises:
            ValueError: a term's saved factors have other shapes than its weights (the model changed).
        """
        shapes = {f.name: [tuple(w.shape) for w in f.weights] for f in terms}
        for name, saved in self._saved.items():
            if name in shapes and "u" in saved and [tuple(u.shape) for u in saved["u"]] != shapes[name]:
                raise ValueError(
                    f"The checkpoint's spred factors for `{name}` have shapes {[tuple(u.shape) for u in saved['u']]}"
                    f" but the model's weights have {shapes[name]}: the model changed since the checkpoint was"
                    " written. Resume with the same model, or load the checkpoint's weights and fit without"
                    " `ckpt_path`."
                )
        gone = sorted(set(self._saved) - set(shapes))
        new = sorted(set(shapes) - set(self._saved)) if self._saved else []
        if gone or new:
            rank_zero_warn(
                f"Resuming with a different choice of penalised weights: no longer penalised {gone or 'none'}, newly"
                f" penalised {new or 'none'} (these start from the checkpoint's weights). If this is not what you"
                " meant, resume with the `include`/`exclude`/`groups` the checkpoint was written with.",
                category=UserWarning,
            )
            for name in gone:
                del self._saved[name]

    def start(self, term: Factorization, scale: Optional[float] = None) -> None:
        """Start ``term``: from its saved state if the checkpoint has one, else from its weights."""
        saved = self._saved.pop(term.name, None)
        if saved is None:
            term.start(scale=scale)
        else:
            term.load_state_dict(saved)

    def state_dict(self, terms: Sequence[Factorization]) -> dict[str, dict[str, Any]]:
        """The started terms' states, and the saved states of terms that have not started since the resume."""
        states = {f.name: f.state_dict() for f in terms if f.started}
        return {**{k: v for k, v in self._saved.items() if k not in states}, **states}
