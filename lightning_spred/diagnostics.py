"""Warnings for penalties that cannot do what the user meant: absorbed scales, dead layers, a run stuck in L2.

- **Scale absorbed.** A normalisation (BatchNorm, LayerNorm, GroupNorm, InstanceNorm) right after a penalised
  layer undoes that layer's scale, so the penalty can shrink the whole layer at no cost to the loss: groups
  shrink without being removed, and entries, which the penalty still chooses among, head with the layer towards
  the normalisation's eps. With channel groups (the normalisation in the group), the next layer's normalisation
  undoes the common scale
  of all the channels: they shrink together and reach zero nearly at once.
- **Scale escape.** A penalised layer followed, through positively homogeneous steps (ReLU, pooling, dropout,
  flatten), by a layer that is neither penalised nor weight-decayed can hand its scale to that layer: the penalty
  then shrinks every weight of the first layer alike instead of choosing among them.
- **Dead layer.** Every weight of a penalised tensor is zero: its output is constant.
- **L2 phase, no zeros.** From a start far from balance spred acts like L2 weight decay until the factors balance
  (with SGD, about ``lam * sum(lr) / (1 - momentum) >= 2``); a run that will not get there, or whose ``lam`` is too
  small to win against the loss anywhere, ends without zeros.

The first two come from one forward pass traced with module hooks (:mod:`lightning_spred.trace`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_spred.factorization import Factorization
from lightning_spred.functional import forecast_exits
from lightning_spred.steering import Steering
from lightning_spred.targets import magnitudes
from lightning_spred.terms import PenaltyTerms
from lightning_spred.trace import HOMOGENEOUS, NORMS, ForwardTrace, following_norms

__all__ = ["FixedLamForecast", "absorbed_terms", "degenerate_penalties"]

#: A fixed ``lam`` forecast to zero fewer than this fraction of the weights by the end is warned about.
NO_ZEROS = 0.01
#: A fixed ``lam`` below this fraction of ``lam_max`` is warned about (two orders of magnitude).
FAR_BELOW = 1e-2


def degenerate_penalties(
    trace: ForwardTrace, terms: Sequence[Factorization], optimizers: Sequence[Optimizer]
) -> list[str]:
    """A message for every penalised layer whose scale a normalisation absorbs or a next layer can take over."""
    penalised = {id(w) for f in terms for w in f.weights}
    decayed = {
        id(p)
        for opt in optimizers
        for group in opt.param_groups
        if group.get("weight_decay", 0)
        for p in group["params"]
    }
    messages = []
    for f in terms:
        own = {id(w) for w in f.weights}  # a channel group holds the normalisation after its layer
        for member in f.members:
            if isinstance(member.module, NORMS) and member.attr == "weight":
                messages += _collapse(trace, f.name, member.module)
                continue
            if member.attr != "weight" or isinstance(member.module, NORMS):
                continue
            norms = following_norms(trace, member.module, own)
            if norms and f.grouped:
                messages.append(
                    f"`{member.name}` feeds a {type(norms[0]).__name__}, which undoes its scale: its groups shrink"
                    " without being removed. Group it with the normalisation (`groups={...: 'channel'}`), penalise"
                    " the normalisation's scale instead (network slimming: `include=['<norm>.weight']`), or exclude"
                    " this weight."
                )
                continue
            if norms:
                messages.append(
                    f"`{member.name}` feeds a {type(norms[0]).__name__}, which undoes its scale: besides choosing"
                    " entries within the layer, the penalty shrinks the whole layer at no cost to the loss, and a long"
                    " run or a large `lam` takes it to the normalisation's eps, where its channels die. Watch"
                    " `spred/dead_layers`, or steer with a target (its layers keep a floor)."
                )
                continue
            escapes = [
                m
                for m in trace.consumers(member.module, through=HOMOGENEOUS)
                if isinstance(getattr(m, "weight", None), Tensor)
                and id(m.weight) not in penalised
                and id(m.weight) not in decayed
                and m.weight.requires_grad
            ]
            if escapes:
                messages.append(
                    f"`{member.name}`'s scale can move into the next {type(escapes[0]).__name__}, which is neither"
                    " penalised nor weight-decayed: the penalty then shrinks the whole layer instead of choosing"
                    " within it. Give that layer a small weight decay (a parameter group with weight_decay=1e-3)"
                    " or a penalty of its own."
                )
    return messages


def _collapse(trace: ForwardTrace, name: str, norm: nn.Module) -> list[str]:
    """A channel group whose normalised output feeds a layer that is normalised again: a common scale is free."""
    for layer in trace.consumers(norm, through=HOMOGENEOUS):
        following = [m for m in trace.consumers(layer) if isinstance(m, NORMS)]
        if following:
            return [
                f"The channels of `{name}` feed a {type(layer).__name__} whose {type(following[0]).__name__} undoes"
                " their common scale: the group penalty can shrink all of them together, so they reach zero"
                " nearly at once instead of one by one (a target counted across layers can switch a whole layer"
                " off). Keep `lam` fixed and small and remove the weakest channels of each layer (their group"
                " norms), as network slimming does."
            ]
    return []


def absorbed_terms(trace: ForwardTrace, terms: Sequence[Factorization]) -> set[str]:
    """Names of the terms whose scale a normalisation undoes: their loss gradient at zero means nothing (a zero-variance
    input divided by ``sqrt(eps)``), so their ``lam_max`` is taken at the current weights."""
    absorbed = set()
    for f in terms:
        own = {id(w) for w in f.weights}
        for member in f.members:
            if member.attr == "weight" and not isinstance(member.module, NORMS):
                if following_norms(trace, member.module, own):
                    absorbed.add(f.name)
            elif (
                isinstance(member.module, NORMS) and member.attr == "weight" and _collapse(trace, f.name, member.module)
            ):
                absorbed.add(f.name)
    return absorbed


class FixedLamForecast:
    """Judges whether a fixed ``lam`` will do anything in this run: against ``lam_max`` at the first batch, and by
    extrapolating from the start to a tenth of the steps.

    - **far below** ``lam_max``: a weight ends at zero only where its loss gradient stays below ``lam``; below a
      hundredth of ``lam_max`` that leaves almost none (on the digits MLP, ``lam = 1e-4`` made no zeros);

    - **the L2 phase**: ``1 - balance`` shrinks about exponentially in the number of steps (under gradient flow with
      SGD, ``u^2 - v^2`` decays at the rate ``2 * lam * lr / (1 - momentum)`` per step, whatever the loss); if the
      extrapolation stays below ``0.9`` at the end, the fit ends while spred still acts like L2 weight decay;
    - **no zeros**: every entry (group) is extrapolated at its own rate of decay; if fewer than 1% are zero or
      forecast to reach the threshold by the end, this ``lam`` makes almost no zeros in this run (the factors may be
      balanced and the penalty still far too small to win against the loss).

    Args:
        steering: the fit's steering, whose ``lam`` (a number, which may change during fit) is judged.
        total_steps: the steps the fit will take (``None``: unknown, no extrapolation).
        fraction: when to judge, as a fraction of ``total_steps``.
        threshold: what counts as zero.
    """

    def __init__(
        self, steering: Steering, total_steps: Optional[int], fraction: float = 0.1, threshold: float = 1e-6
    ) -> None:
        self.steering = steering
        self.total_steps = total_steps or 0
        self.check_step = max(1, int(fraction * self.total_steps))
        self.threshold = threshold
        self.first: Optional[tuple[int, float, Tensor]] = None
        self.done = self.total_steps < 50  # too short to judge
        #: whether ``lam_max`` is still to be judged (at the first batch)
        self.wants_lam_max = self.lam > 0

    @property
    def lam(self) -> float:
        """The live ``lam``: the last step's, or the one asked for before the first step."""
        return self.steering.current_lam or self.steering.lam_value(0, 0)

    def judge_lam_max(self, lam_max: float) -> list[str]:
        """The warning for a ``lam`` far below ``lam_max``, once."""
        self.wants_lam_max = False
        if not lam_max or self.lam >= FAR_BELOW * lam_max:
            return []
        return [
            f"`lam={self.lam:g}` is {lam_max / self.lam:,.0f} times below `lam_max={lam_max:.4g}` (where every"
            " penalised weight would be zero): a weight ends at zero only where its loss gradient stays below `lam`,"
            " which so small a `lam` leaves to almost none. Raise it, or give a target (`target_sparsity=`)."
        ]

    def observe(self, step: int, terms: PenaltyTerms) -> list[str]:
        """Record the terms after ``step``; return the warnings due, once, at the judging step."""
        if self.done or not terms.scheduled:
            return []
        now = magnitudes(terms.scheduled)
        if self.first is None:
            self.first = (step, 1 - terms.census().host().mean_balance, now)
            return []
        if step < self.check_step:
            return []
        self.done = True
        start, gap_start, before = self.first
        exits = forecast_exits(before, now, step - start, self.total_steps - step, max(self.threshold, 1e-30))
        census = terms.census().with_extra(exits=exits.reshape(1).to(torch.float64)).host()
        messages = [self._l2_phase(step, start, gap_start, 1 - census.mean_balance)]
        forecast = census.zeros + int(census.extra["exits"][0])
        if forecast < NO_ZEROS * census.entries:
            messages.append(
                f"SpredCallback: `lam={self.lam:g}` will make almost no zeros in this run: {census.zeros} after {step}"
                f" of {self.total_steps} steps, and at their rates of decay {forecast:,} of {census.entries:,} weights"
                f" (under {NO_ZEROS:.0%}) reach the threshold ({self.threshold:g}) by the end. Raise `lam` (tens of"
                " times), train longer, or steer with a target (`target_sparsity=`), which finds `lam` itself."
            )
        return [m for m in messages if m]

    def _l2_phase(self, step: int, start: int, gap_start: float, gap: float) -> str:
        if gap <= 0.1:
            return ""
        rate = math.log(gap_start / gap) / (step - start) if gap_start > gap > 0 else 0.0
        if gap * math.exp(-rate * (self.total_steps - step)) <= 0.1:
            return ""
        needed = f"about {step + math.log(gap / 0.1) / rate:,.0f} steps" if rate > 0 else "more steps than any"
        return (
            f"spred is still in its L2 phase: balance {1 - gap:.2f} after {step} of {self.total_steps} steps, and at"
            f" this rate it reaches 0.9 (where the penalty acts as L1 and weights become exactly zero) after {needed}."
            " Raise `lam` or the learning rate, train longer, or steer with a target (`target_sparsity=`)."
            " With SGD, zeros appear once lam * sum(lr) / (1 - momentum) reaches about 2."
        )
