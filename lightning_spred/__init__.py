"""Exact L1 and group-L1 penalties for any PyTorch Lightning model, with one callback (spred, ICML 2023)."""

from lightning_spred.callback import SpredCallback
from lightning_spred.factorization import Factorization, factorize, merge
from lightning_spred.selection import DEFAULT_MODULES, Target, select_parameters

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODULES",
    "Factorization",
    "SpredCallback",
    "Target",
    "factorize",
    "merge",
    "select_parameters",
]
