"""``lam_max``: the smallest ``lam`` at which a penalised weight set to zero stays zero.

For ``loss(w) + lam * sum_g ||w_g||``, ``w = 0`` satisfies the optimality condition exactly when every group's
gradient at ``w = 0`` has norm ``<= lam``, so ``lam_max = max_g ||dL/dw_g (w = 0)||`` (with the rest of the
model fixed). For a linear model this is the ``lam`` at which the lasso path ends (scikit-learn's ``alpha_max``
times two for ``MSELoss``); for a network it moves as the other layers train, so schedules given relative to it
(``relative=True``) get a sensible scale, not an exact end point.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_spred.factorization import Factorization
from lightning_spred.functional import joint_group_norms

__all__ = ["lam_max", "lam_max_of_batch", "side_effect_free", "term_lam_max"]


def lam_max(
    loss_fn: Callable[[], Tensor],
    weights: Sequence[Tensor],
    dim: Optional[int] = None,
    reduce: Callable[[Tensor], Tensor] = lambda grad: grad,
    at_zero: bool = True,
) -> float:
    """``max_g ||dL/dw_g||`` at ``w = 0`` for one penalty term: the ``lam`` above which it is entirely zero.

    Args:
        loss_fn: computes the training loss with the model as it is (one forward pass).
        weights: the term's tensors (parameters of the model), set to zero for the computation and restored.
        dim: ``None`` for elementwise L1, else the group dimension shared by ``weights``.
        reduce: applied to each gradient before the norms, for example an average across processes.
        at_zero: ``False`` takes the gradient at the weights as they are: the ``lam`` at which the largest group
            is in balance with the penalty, a scale for the cases where the gradient at zero vanishes (a channel
            group whose output goes through a ReLU gets no gradient at zero).

    Example:
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([2.0, -4.0])
        >>> w = nn.Parameter(torch.tensor([0.3, 0.3]))
        >>> lam_max(lambda: ((x @ w - y) ** 2).mean(), [w])  # |2/n X^T y|_max
        4.0
    """
    grads = _gradients(loss_fn, weights, reduce, at_zero)
    return float(joint_group_norms(grads, [dim] * len(grads)).max())


def term_lam_max(
    loss_fn: Callable[[], Tensor], term: Factorization, reduce: Callable[[Tensor], Tensor], at_zero: bool
) -> float:
    """:func:`lam_max` of a penalty term, whose tensors may group along different dimensions of their own views (an
    attention's heads: rows of q, k and v, columns of the output projection)."""
    grads = _gradients(loss_fn, term.weights, reduce, at_zero)
    return float(joint_group_norms([m.view(g) for m, g in zip(term.members, grads)], term.dims).max())


def _gradients(
    loss_fn: Callable[[], Tensor], weights: Sequence[Tensor], reduce: Callable[[Tensor], Tensor], at_zero: bool
) -> list[Tensor]:
    """The loss gradients of ``weights`` (at zero, or as they are), which are left as they were."""
    saved = [w.detach().clone() for w in weights]
    try:
        if at_zero:
            with torch.no_grad():
                for w in weights:
                    w.zero_()
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(), list(weights), allow_unused=True)
    finally:
        with torch.no_grad():
            for w, value in zip(weights, saved):
                w.copy_(value)
    return [reduce(torch.zeros_like(w) if g is None else g) for w, g in zip(weights, grads)]


@contextlib.contextmanager
def side_effect_free(module: nn.Module) -> Iterator[None]:
    """Run extra forward passes of a LightningModule without a trace: no logging, same RNG state and buffers.

    Inside, ``module.log`` and ``module.log_dict`` do nothing; on exit the random number generators (CPU and the
    module's CUDA device) and every buffer (BatchNorm running statistics) are as they were on entry.
    """
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    devices = sorted({b.device.index for b in module.parameters() if b.device.type == "cuda"})
    silenced = {name: getattr(module, name, None) for name in ("log", "log_dict")}

    def no_log(*args: Any, **kwargs: Any) -> None:
        return None

    for name in silenced:
        object.__setattr__(module, name, no_log)
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for name in silenced:
            module.__dict__.pop(name, None)
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)


def lam_max_of_batch(
    trainer: Trainer,
    module: LightningModule,
    batch: Any,
    batch_idx: int,
    terms: Sequence[Factorization],
    absorbed: Callable[[], set[str]] = set,
) -> float:
    """The largest :func:`lam_max` of the penalty terms, from the training loss of one batch (averaged over DDP ranks).

    Args:
        trainer: the trainer (for the average across processes).
        module: the LightningModule, with automatic optimization (its ``training_step`` gives the loss).
        batch: a training batch.
        batch_idx: its index.
        terms: the penalty terms.
        absorbed: called after the first forward pass, the names of the terms whose scale a normalisation undoes:
            their gradient at zero means nothing (BatchNorm divides a zero-variance input by ``sqrt(eps)``), so
            theirs is taken at the current weights.
    """

    def loss() -> Tensor:
        output = module.training_step(batch, batch_idx)
        return output["loss"] if isinstance(output, Mapping) else output

    def mean(grad: Tensor) -> Tensor:
        return trainer.strategy.reduce(grad, reduce_op="mean")

    terms = [f for f in terms if f.trainable]  # a frozen weight has no gradient to measure
    if not terms:
        return 0.0
    with side_effect_free(module):
        with torch.no_grad():
            loss()  # which terms a normalisation absorbs is known once a forward pass has been traced
        current = absorbed()
        # a LoRA rank is bilinear (the loss sees lora_B @ lora_A): zero is stationary for any lam, so its scale is taken
        # at the weights as they are, as for the terms a normalisation absorbs
        value = max(term_lam_max(loss, f, mean, at_zero=f.name not in current and f.kind != "rank") for f in terms)
        vanished = value == 0
        if vanished:
            value = max(term_lam_max(loss, f, mean, at_zero=False) for f in terms)
    if vanished:
        rank_zero_info(
            "SpredCallback: the penalised weights get no gradient at zero (their output goes through a ReLU"
            f" or the like), so lam_max is 0; scaling with the largest gradient norm now, {value:.4g}, instead."
        )
    else:
        rank_zero_info(f"SpredCallback: lam_max = {value:.4g} (largest of {len(terms)} weights), from one batch.")
    return value
