"""Let an optimizer train the spred factors in place of the weights, only while it steps.

Outside ``optimizer.step`` the optimizer holds the plain weights, exactly as the user built it: its parameter
groups (by name, by layer, added later by a fine-tuning callback), gradient clipping, AMP unscaling,
``zero_grad`` and ``state_dict`` all see the plain model, so checkpoints of the optimizer have the plain
layout. Inside the step, each penalised weight ``w_i`` in a parameter group is replaced by its factor
``u_i`` (the shared ``v`` joins the group of the first member), so the factors train with their
weight's learning rate and settings, and the factors' optimizer state (momentum, moments) is lent to the
optimizer for the step and taken back after it.

Order within ``optimizer.step(closure)``: the closure runs (forward, backward, AMP unscaling, clipping, all on
the plain weights), then the controller gives ``lam``, the weights' gradients become the factors' gradients plus
the decay, the factors are swapped in, the optimizer updates them, and the weights are set to ``u_i * v``. Without
a closure (``GradScaler.step``, plain PyTorch) the gradients are final when the step starts. A frozen term (the
refit) is not swapped: its weights train within their mask.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_spred.factorization import Factorization
from lightning_spred.resume import SavedTerms
from lightning_spred.steering import Steering
from lightning_spred.terms import PenaltyTerms

__all__ = ["Clock", "FactorStepper"]


class Clock(Protocol):
    """Where training is: Lightning's ``Trainer`` is one."""

    @property
    def global_step(self) -> int: ...

    @property
    def current_epoch(self) -> int: ...


# (param list, index) of one member's weight in the optimizer's parameter groups
_Place = tuple[list, int]


class FactorStepper:
    """Trains, inside one optimizer's steps, the factors of the penalised weights that optimizer holds.

    Args:
        optimizer: the user's optimizer.
        terms: the penalty terms of the whole model; the stepper handles those whose weights are in this
            optimizer's parameter groups at the time of each step (groups may change during fit).
        steering: gives ``lam`` before each step.
        saved: the terms' states of a checkpoint, applied when each term starts.
        clock: the step and epoch (the trainer).
        start_scale: the scale of new factors (see :meth:`Factorization.start`; ``None``: near balance).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        terms: PenaltyTerms,
        steering: Steering,
        saved: SavedTerms,
        clock: Clock,
        start_scale: Optional[float] = None,
    ) -> None:
        self.optimizer = optimizer
        self.terms, self.steering, self.saved, self.clock = terms, steering, saved, clock
        self.start_scale = start_scale
        self._by_weight = {id(m.weight): (f, i) for f in terms for i, m in enumerate(f.members)}
        self._frozen: list[Factorization] = []
        self._located: tuple[Any, dict[Factorization, dict[int, _Place]]] = ((), {})
        self._stepping: list[Factorization] = []
        self._swapped: list[tuple[list, int, Tensor]] = []
        self._appended: list[list] = []
        self._handles: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    def held(self) -> list[Factorization]:
        """The terms whose weights are all in this optimizer now."""
        return [f for f, places in self._locate().items() if len(places) == len(f.members)]

    def detach(self) -> None:
        """Give the optimizer back its plain parameter groups (also after a step that raised) and remove the hooks."""
        self._restore()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ----------------------------------------------------------------------------------------------
    def _pre_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        # `args` starts with the optimizer itself: `step(self, closure=None)`.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._swap_in()
            return None

        def closure_then_swap() -> Any:
            result = closure()
            self._swap_in()
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_swap}
        return (args[0], closure_then_swap, *args[2:]), kwargs

    def _post_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        stepped, frozen = self._stepping, self._frozen
        self._restore()
        for f in stepped:
            f.refresh()
            for tensor in (*f.u, f.v):  # type: ignore[misc]
                tensor.grad = None
        for f in frozen:
            f.mask_weights()  # momentum and decoupled weight decay would move the zeros

    def _locate(self) -> dict[Factorization, dict[int, _Place]]:
        # The groups change rarely (a fine-tuning callback adds one): the places are found again only when they do.
        key = tuple((id(g["params"]), len(g["params"])) for g in self.optimizer.param_groups)
        if key != self._located[0]:
            places: dict[Factorization, dict[int, _Place]] = {}
            for group in self.optimizer.param_groups:
                params = group["params"]
                for index, param in enumerate(params):
                    entry = self._by_weight.get(id(param))
                    if entry is not None:
                        places.setdefault(entry[0], {})[entry[1]] = (params, index)
            self._located = (key, places)
        return self._located[1]

    def _swap_in(self) -> None:
        located = [
            (f, places)
            for f, places in self._locate().items()
            if len(places) == len(f.members) and f.trainable  # frozen means unchanged: no decay either
        ]
        # A step in which none of these weights got a gradient (a skipped batch) changes none of them.
        if not any(w.grad is not None for f, _ in located for w in f.weights):
            return
        for f, _ in located:
            if not f.started and not f.frozen:
                self.saved.start(f, self.start_scale)
        self._frozen = [f for f, _ in located if f.frozen]
        for f in self._frozen:
            f.mask_gradients()
        located = [(f, places) for f, places in located if not f.frozen]
        sizes = [_step_size(self._group_of(places[0][0])) for f, places in located if f.scheduled]
        step_size = max((s for s in sizes if s is not None), default=None)
        self.terms.apply(self.steering.start_step(self.clock.global_step, self.clock.current_epoch, step_size))
        state = self.optimizer.state
        for f, places in located:
            f.accumulate_gradients()
            factors = [*f.u, f.v]  # type: ignore[misc]
            for i, (params, index) in sorted(places.items()):
                self._swapped.append((params, index, params[index]))
                params[index] = f.u[i]  # type: ignore[index]
            params = places[0][0]
            params.append(f.v)
            self._appended.append(params)
            group = self._group_of(params)
            for tensor, saved in zip(factors, f.optimizer_state or ()):
                if saved:
                    state[tensor] = _to_device(saved, tensor, group)
            self._stepping.append(f)

    def _restore(self) -> None:
        for params in reversed(self._appended):
            params.pop()
        for params, index, weight in reversed(self._swapped):
            params[index] = weight
        for f in self._stepping:
            f.optimizer_state = [self.optimizer.state.pop(t, {}) for t in (*f.u, f.v)]  # type: ignore[misc]
        self._appended.clear()
        self._swapped.clear()
        self._stepping, self._frozen = [], []

    def _group_of(self, params: list) -> dict[str, Any]:
        return next(g for g in self.optimizer.param_groups if g["params"] is params)


def _step_size(group: dict[str, Any]) -> Optional[float]:
    """How far one step of the decay alone moves the factors with SGD, ``lr / (1 - momentum)``; ``None`` for
    optimizers whose steps do not scale with the gradient (Adam's)."""
    if "betas" in group or "lr" not in group:
        return None
    return float(group["lr"]) / (1 - float(group.get("momentum", 0.0)))


def _to_device(state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state (from a checkpoint) on the factor's device, as ``Optimizer.load_state_dict`` places it."""
    if all(not isinstance(v, Tensor) or v.device == param.device or k == "step" for k, v in state.items()):
        return state  # the usual case, between two steps: nothing to move
    moved: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            moved[key] = value
        elif key == "step" and not (group.get("fused") or group.get("capturable")):
            moved[key] = value  # kept on the CPU, as torch keeps it
        elif value.is_floating_point() and key != "step":
            moved[key] = value.to(device=param.device, dtype=param.dtype)
        else:
            moved[key] = value.to(device=param.device)
    return moved
