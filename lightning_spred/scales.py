"""Give the layers a normalisation absorbs their scale back before a refit.

A normalisation right after a penalised layer (BatchNorm after a conv) undoes the layer's scale, so the penalty
shrinks such a layer as a whole at no cost to the loss. The layer computes the same function at any scale, but its
optimizer does not see the same problem: a step of fixed size moves a small weight further in relative terms (the
effective learning rate of a scale-invariant weight is ``lr / |w|^2`` with SGD). In a probe on a BatchNorm ResNet
on MNIST with a 90% target, the conv weights' norm fell from 14 to 0.6 by the refit, and refitting at that scale
lost accuracy (0.974 before the refit, 0.960 after); multiplied back to their norm when penalising began, the refit
ended at 0.982.

:func:`restore_norms` does that multiplication: each such layer's weight (and bias) by ``start / now`` when it
shrank (a layer that grew, as scale-free weights do under plain SGD, is left as it is), and the
running mean and variance of the normalisations after it by the same factor and its square, so that training and
evaluation compute what they computed before (up to the normalisation's ``eps``). Zeros stay zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from lightning_spred.factorization import Factorization
from lightning_spred.trace import ForwardTrace, following_norms

__all__ = ["AbsorbedScale", "find_absorbed", "restore_norms"]


@dataclass(frozen=True, eq=False)
class AbsorbedScale:
    """A penalised layer whose every output goes straight into normalisations.

    Attributes:
        term: the penalty term that holds the layer's weight.
        index: the weight's place among the term's members.
        norms: the normalisations that take the layer's output.
    """

    term: Factorization
    index: int
    norms: tuple[nn.Module, ...]

    @property
    def module(self) -> nn.Module:
        return self.term.members[self.index].module


def find_absorbed(trace: ForwardTrace, terms: Sequence[Factorization]) -> list[AbsorbedScale]:
    """The penalised layers whose scale the normalisations after them undo, from one traced forward pass.

    A layer qualifies only when every consumer of its output is a normalisation outside its own term (a channel
    group that holds its BatchNorm is scaled by that BatchNorm's parameters, which are not scale-free).
    """
    found = []
    for f in terms:
        own = {id(w) for w in f.weights}
        for index, member in enumerate(f.members):
            if member.attr != "weight":
                continue
            norms = following_norms(trace, member.module, own)
            consumers = trace.consumers(member.module)
            if norms and len(norms) == len(consumers):
                found.append(AbsorbedScale(f, index, tuple(norms)))
    return found


@torch.no_grad()
def restore_norms(absorbed: Sequence[AbsorbedScale]) -> Tensor:
    """Multiply each layer back to its weight's norm when its term started (see the module's docstring).

    Returns:
        Each layer's norm before the call as a fraction of its start (on the weights' device; 1 where nothing was
        done: a term that never started, a weight that is entirely zero or not finite).
    """
    factors = []
    for layer in absorbed:
        weight = layer.term.weights[layer.index]
        starts = layer.term.start_norms
        if starts is None:
            factors.append(torch.ones((), device=weight.device))
            continue
        now = weight.norm()
        usable = (now > 0) & torch.isfinite(now) & torch.isfinite(starts[layer.index])
        # only what the penalty took is given back: a layer that grew (plain SGD grows scale-free weights) stays
        factor = torch.where(usable, starts[layer.index] / now.clamp_min(torch.finfo(now.dtype).tiny), 1.0)
        factor = factor.clamp_min(1.0)
        weight.mul_(factor)
        bias = getattr(layer.module, "bias", None)
        if isinstance(bias, Tensor):
            bias.mul_(factor)
        for norm in layer.norms:
            if getattr(norm, "running_mean", None) is not None:
                norm.running_mean.mul_(factor)  # type: ignore[operator]
            if getattr(norm, "running_var", None) is not None:
                norm.running_var.mul_(factor.square())  # type: ignore[operator]
        factors.append(factor)
    return torch.stack(factors) if factors else torch.ones(0)
