"""What a finished fit leaves for the user, also when the fit ran in other processes.

Under ``strategy="ddp_spawn"`` the fit runs in worker processes: the callback object the script holds never sees
it. Lightning brings the model's weights back to the launching process; :class:`FitResults` does the same for the
callback's results: rank zero saves them to a file whose name every copy of the callback shares, and the launching
process reads it the first time the results are asked for.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_spred.report import LayerSparsity, SparsityReport
from lightning_spred.terms import PenaltyTerms

__all__ = ["FitResults"]


class FitResults:
    """The per-layer report and the grouped weights' group norms of the last fit."""

    def __init__(self) -> None:
        self.report: Optional[SparsityReport] = None
        #: per grouped term: (group dimension, group norms on the CPU)
        self.norms: dict[str, tuple[int, Tensor]] = {}
        self._handoff = Path(tempfile.gettempdir()) / f"lightning_spred-{uuid.uuid4().hex}.pt"

    def clear(self) -> None:
        self.report, self.norms = None, {}

    def keep(self, report: SparsityReport, terms: PenaltyTerms) -> None:
        self.report = report
        self.norms = {f.name: (f.dims[0], f.norms().detach().cpu()) for f in terms if f.grouped}

    @staticmethod
    def in_spawned_worker() -> bool:
        return multiprocessing.parent_process() is not None

    def hand_off(self, extra: dict[str, Any]) -> None:
        """In a spawned worker, rank zero: save the results (and ``extra`` state) for the launching process."""
        assert self.report is not None
        report = [[layer.name, layer.parameters, layer.nonzeros] for layer in self.report.layers]
        norms = {name: [dim, norms] for name, (dim, norms) in self.norms.items()}
        torch.save({"report": report, "norms": norms, **extra}, self._handoff)

    def take_over(self) -> Optional[dict[str, Any]]:
        """In the launching process: the results a worker left (once), with its ``extra`` state; ``None`` if none."""
        if not self._handoff.exists():
            return None
        saved = torch.load(self._handoff, weights_only=True)
        self._handoff.unlink()
        self.report = SparsityReport(tuple(LayerSparsity(*row) for row in saved.pop("report")))
        self.norms = {name: (dim, norms) for name, (dim, norms) in saved.pop("norms").items()}
        return saved
