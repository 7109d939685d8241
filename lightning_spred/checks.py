"""Argument, strategy and optimizer checks, each failing before training with a message that names the fix."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import LBFGS, AdamW, Optimizer

from lightning_spred.factorization import Factorization

__all__ = [
    "check_coefficient",
    "check_optimizers",
    "check_strategy",
    "training_budget",
]


def check_coefficient(name: str, value: Any) -> float:
    """A finite real number ``>= 0`` (Python, NumPy, or any one-element array or tensor), as a float."""
    size = value.numel() if isinstance(value, torch.Tensor) else getattr(value, "size", None)
    item = value.item() if size == 1 and hasattr(value, "item") else value
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        number = float(item)
    else:
        raise TypeError(f"`{name}` must be a real number such as 1e-4, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0 (for example 1e-4), got {number}.")
    return number


def training_budget(trainer: Trainer, total_steps: Optional[int], needed: bool) -> Optional[int]:
    """The number of optimizer steps of the fit: ``total_steps`` if given, else Lightning's estimate if it is finite.

    Raises:
        ValueError: ``needed`` (a target, a relative schedule or a refit) and the fit's length is unknown (an
            ``IterableDataset`` without ``max_steps``, ``max_time`` alone, ``max_epochs=-1``).
    """
    if total_steps is not None:
        return total_steps
    estimate = trainer.estimated_stepping_batches
    if isinstance(estimate, (int, float)) and math.isfinite(estimate) and estimate > 0:
        return int(estimate)
    if needed:
        raise ValueError(
            "SpredCallback's target, relative schedule or refit is planned over the fit's optimizer steps, but this"
            " fit's length is unknown (an IterableDataset without `max_steps`, `max_time`, or `max_epochs=-1`). Give"
            " `Trainer(max_steps=...)`, or `SpredCallback(..., total_steps=...)`."
        )
    return None


def check_strategy(trainer: Trainer) -> None:
    """Single device or DDP: sharded strategies split the weights spred factorises."""
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"SpredCallback supports single-device training and DDP (`strategy='ddp'`, 'ddp_spawn', 'ddp_fork'),"
            f" not {type(strategy).__name__}: sharded strategies split the weights that spred factorises."
            " Use `strategy='ddp'`."
        )


def check_optimizers(
    trainer: Trainer, optimizers: Sequence[Optimizer], factorizations: Sequence[Factorization]
) -> None:
    """Refuse optimizers spred cannot work with; warn about settings that change the penalty or leave it out."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    group_of = {id(p): (opt, group) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    untrained, decoupled, decayed = [], [], []
    for f in factorizations:
        places = [group_of.get(id(w)) for w in f.weights]
        if None in places:
            if f.trainable:
                untrained.append(f.name)
            continue
        if len({id(opt) for opt, _ in places}) > 1:  # type: ignore[misc]
            raise ValueError(
                f"The tensors of `{f.name}` ({', '.join(m.name for m in f.members)}) share one spred factor, so they"
                " must be in the same optimizer."
            )
        optimizer, group = places[0]  # type: ignore[misc]
        if isinstance(optimizer, LBFGS):
            raise ValueError(
                "LBFGS re-evaluates the model inside its step, while SpredCallback updates the weights from their"
                " factors only between steps. Use a first-order optimizer (SGD, Adam, ...)."
            )
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            raise ValueError(
                f"{type(optimizer).__name__} unscales gradients inside its own step (fused=True), after SpredCallback"
                " has added the penalty, so the penalty would be divided by the loss scale. Use `fused=False`."
            )
        if group.get("weight_decay", 0):
            (decoupled if isinstance(optimizer, AdamW) else decayed).append(f"{f.name} ({group['weight_decay']})")
    if untrained:
        rank_zero_warn(
            f"{_names(untrained)} {'is' if len(untrained) == 1 else 'are'} penalised but in no optimizer, so not"
            " trained and not penalised. Build"
            " the optimizer from `self.parameters()`, or add them later (a fine-tuning callback's"
            " `unfreeze_and_add_param_group`): a weight is penalised from the step it trains.",
            category=UserWarning,
        )
    if decoupled:
        rank_zero_warn(
            f"AdamW applies decoupled weight decay to the factors of {_names(decoupled)}: it is not the L1 penalty and"
            " shrinks weights by an amount that depends on the learning rate. SpredCallback already applies `lam`;"
            " use Adam, or put the penalised weights in a parameter group with weight_decay=0.",
            category=UserWarning,
        )
    if decayed:
        rank_zero_warn(
            f"The optimizer's weight_decay applies to the factors of {_names(decayed)}, and adds to `lam` (the"
            " effective L1 coefficient is lam + weight_decay). Put the penalised weights in a parameter group with"
            " weight_decay=0 to penalise them with `lam` alone.",
            category=UserWarning,
        )


def _names(names: Sequence[str], limit: int = 6) -> str:
    return ", ".join(f"`{n}`" for n in names[:limit]) + (
        f" and {len(names) - limit} more" if len(names) > limit else ""
    )
