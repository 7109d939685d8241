"""Exact L1 and group-L1 penalties for any PyTorch Lightning model, with one callback (spred, ICML 2023)."""

from lightning_spred.callback import SpredCallback
from lightning_spred.factorization import Factorization, Member
from lightning_spred.features import FeatureSelection, selected_features
from lightning_spred.lam_max import lam_max
from lightning_spred.metrics import Sparsity
from lightning_spred.path import PathPoint, RegularizationPath
from lightning_spred.report import LayerSparsity, SparsityReport
from lightning_spred.schedules import Constant, GeometricRamp, LambdaSchedule, LamSchedule, Warmup
from lightning_spred.selection import DEFAULT_MODULES, PenalisedParameter, Selection, select_parameters
from lightning_spred.shrink import ShrinkResult, shrink
from lightning_spred.stability import aggregate_rankings, stability_selection
from lightning_spred.steering import Phase
from lightning_spred.targets import Target

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODULES",
    "Constant",
    "Factorization",
    "FeatureSelection",
    "GeometricRamp",
    "LamSchedule",
    "LambdaSchedule",
    "LayerSparsity",
    "Member",
    "PathPoint",
    "PenalisedParameter",
    "Phase",
    "RegularizationPath",
    "Selection",
    "ShrinkResult",
    "Sparsity",
    "SparsityReport",
    "SpredCallback",
    "Target",
    "Warmup",
    "aggregate_rankings",
    "lam_max",
    "select_parameters",
    "selected_features",
    "shrink",
    "stability_selection",
]
