"""Exact L1 and group-L1 penalties for any PyTorch Lightning model, with one callback (spred, ICML 2023)."""

from lightning_spred.callback import SpredCallback
from lightning_spred.factorization import Factorization, factorize, merge
from lightning_spred.groups import FeatureSelection, selected_features
from lightning_spred.metrics import Sparsity
from lightning_spred.report import LayerSparsity, SparsityReport
from lightning_spred.selection import DEFAULT_MODULES, Target, select_parameters
from lightning_spred.shrink import ShrinkResult, shrink

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODULES",
    "Factorization",
    "FeatureSelection",
    "LayerSparsity",
    "ShrinkResult",
    "Sparsity",
    "SparsityReport",
    "SpredCallback",
    "Target",
    "factorize",
    "merge",
    "select_parameters",
    "selected_features",
    "shrink",
]
