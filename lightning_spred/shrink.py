"""Make a sparse network smaller: remove the heads, neurons and channels whose contribution is a constant.

After training with groups, whole attention heads, feed-forward neurons, LoRA ranks, rows of a ``Linear`` or conv
filters are exactly zero. What such a unit contributes is then a constant, whatever the input, and the weights alone
prove it: :mod:`lightning_spred.remove_units` cuts zero heads, neurons and ranks out of transformers (their tensors
and their modules' sizes), :mod:`lightning_spred.remove_channels` removes constant channels of plain layers across
residual sums (with torch-pruning's dependency graph), folding each constant where it lands. A unit whose constancy
would depend on the data stays, with the reason in :attr:`ShrinkResult.skipped`.

Every removal is then checked on inputs other than the example (the example perturbed, and a batch drawn like it)
against the model as it was, with a tolerance measured from the model's own floating-point error (its outputs in
float64 against float32); a removal that changes the outputs beyond it is an error that names the unit and by how much.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_spred.remove_channels import PRUNABLE, plan_channels
from lightning_spred.remove_units import plan_removal
from lightning_spred.units import FINDERS, Units, find_units

__all__ = ["ShrinkResult", "shrink"]

Inputs = Union[Tensor, Sequence[Any], Mapping[str, Any]]


@dataclass
class ShrinkResult:
    """What :func:`shrink` did.

    Attributes:
        model: the smaller model (a copy, in the mode the input was in: the model passed in is not changed).
        removed: layer (or attention, feed-forward block, LoRA layer) name to the number of units removed.
        skipped: name to the reason some of its zero units were kept.
        macs: multiply-accumulates of one forward pass on ``example_inputs``, before and after (``(0, 0)`` when
            torch-pruning cannot count them for this model).
        parameters: parameter counts, before and after.
        difference: the largest difference of the outputs, over the check inputs, from the model passed in.
        tolerance: the tolerance the outputs were checked against.
    """

    model: nn.Module
    removed: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    macs: tuple[int, int] = (0, 0)
    parameters: tuple[int, int] = (0, 0)
    difference: float = 0.0
    tolerance: float = 0.0


def shrink(
    model: nn.Module,
    example_inputs: Inputs,
    layers: Optional[Sequence[str]] = None,
    check_inputs: Optional[Sequence[Inputs]] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
) -> ShrinkResult:
    """Return a copy of ``model`` without the heads, neurons, ranks and channels whose contribution is a constant.

    Args:
        model: a trained model (for example the one ``SpredCallback`` returns).
        example_inputs: a batch the model accepts (a tensor, a tuple of positional inputs or a dict of keyword
            inputs), used to trace the graph and to read the constants the weights proved constant.
        layers: names of the layers, attentions, feed-forward blocks or LoRA layers to shrink (default: all).
        check_inputs: batches the result is checked on besides the example (default: the example perturbed and a
            batch drawn like it: noise of the example's mean and spread, or random ids in its range).
        rtol: relative tolerance of the check, instead of the measured one (with ``atol``).
        atol: absolute tolerance of the check, instead of the measured one.

    Raises:
        ImportError: channels of plain layers are to be removed and ``torch-pruning`` is not installed.
        RuntimeError: a removal changed the outputs beyond the tolerance (it names the unit and by how much).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with torch.no_grad():
        ...     net[0].weight[1] = 0.0
        ...     net[0].bias[1] = 0.0
        >>> result = shrink(net, torch.randn(8, 4))
        >>> result.removed, result.model[0].weight.shape
        ({'0': 1}, torch.Size([2, 4]))
    """
    small = copy.deepcopy(model).eval()
    inputs = example_inputs
    batches = [inputs, *(check_inputs if check_inputs is not None else _drawn_like(inputs))]
    with torch.no_grad():
        reference = [_outputs(_call(small, batch)) for batch in batches]
    check = _Check(small, batches, reference, _tolerance(model, batches, reference, rtol, atol))
    macs_before = _macs(small, inputs)
    params_before = sum(p.numel() for p in small.parameters())
    result = ShrinkResult(small, tolerance=check.tolerance)
    covered = _remove_units(small, inputs, layers, result, check)
    _remove_channels(small, inputs, layers, covered, result, check)
    result.macs = (macs_before, _macs(small, inputs) if macs_before else 0)
    result.parameters = (params_before, sum(p.numel() for p in small.parameters()))
    result.difference = check.worst
    small.train(model.training)
    return result


def _remove_units(
    model: nn.Module, inputs: Inputs, layers: Optional[Sequence[str]], result: ShrinkResult, check: _Check
) -> set[int]:
    """Zero heads, neurons and ranks of the transformer blocks; returns the ids of every layer the units span (their
    outputs are units, not channels)."""
    found: list[Units] = []
    for path, module in model.named_modules():
        for kind in FINDERS:
            try:
                found += find_units(kind, module, path)
            except ValueError as error:
                result.skipped[path] = str(error)
    covered = {id(part.module) for units in found for part in units.slices}
    downs = {part.module for units in found for part in units.slices if part.role == "down"}
    down_inputs = _inputs_of(model, inputs, downs)
    for units in found:
        if layers is not None and units.name not in layers:
            continue
        plan = plan_removal(units, down_inputs)
        if plan is None:
            continue
        if plan.reason:
            result.skipped[units.name] = plan.reason
        if plan.removed:
            plan.apply()
            check(f"{len(plan.removed)} {units.kind}s of `{units.name}`")
            result.removed[units.name] = len(plan.removed)
    return covered


def _remove_channels(
    model: nn.Module,
    inputs: Inputs,
    layers: Optional[Sequence[str]],
    covered: set[int],
    result: ShrinkResult,
    check: _Check,
) -> None:
    candidates = [
        (name, layer)
        for name, layer in model.named_modules()
        if isinstance(layer, PRUNABLE) and id(layer) not in covered and (layers is None or name in layers)
    ]
    if not any(_may_be_constant(layer) for _, layer in candidates) and not _zero_batchnorm_scale(model):
        return
    try:
        import torch_pruning as tp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("shrink needs torch-pruning to remove channels: `pip install torch-pruning`.") from error
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=_tuple(inputs))  # traces with autograd
    with torch.no_grad():
        for name, layer in candidates:
            plan = plan_channels(model, graph, layer, lambda: _call(model, inputs))
            if plan is None:
                continue
            if plan.reason:
                result.skipped[name] = plan.reason
            if plan.removed:
                plan.apply()
                check(f"{len(plan.removed)} output units of `{name}`")
                result.removed[name] = len(plan.removed)


class _Check:
    """The outputs on every check batch against the model as it was, after each removal."""

    def __init__(
        self, model: nn.Module, batches: list[Inputs], reference: list[list[Tensor]], tolerance: float
    ) -> None:
        self.model, self.batches, self.reference = model, batches, reference
        self.tolerance = tolerance
        self.worst = 0.0

    @torch.no_grad()
    def __call__(self, what: str) -> None:
        for index, (batch, expected) in enumerate(zip(self.batches, self.reference)):
            got = _outputs(_call(self.model, batch))
            difference = max(((g.double() - e.double()).abs().max().item() for g, e in zip(got, expected)), default=0.0)
            self.worst = max(self.worst, difference)
            if len(got) != len(expected) or not difference <= self.tolerance:
                batch_name = "the example" if index == 0 else f"check batch {index}"
                raise RuntimeError(
                    f"shrink: removing {what} changed the outputs by up to {difference:.3g} on {batch_name} (tolerance"
                    f" {self.tolerance:.3g}): that removal is not exact. The model passed in is unchanged; please"
                    " report this with the model's layout."
                )


def _tolerance(
    model: nn.Module, batches: list[Inputs], reference: list[list[Tensor]], rtol: Optional[float], atol: Optional[float]
) -> float:
    """The largest difference a removal may make: given, or ten times the model's own floating-point error (float64
    against float32 on the check batches) plus a few units in the last place of its largest output."""
    scale = max((t.abs().max().item() for outputs in reference for t in outputs if t.numel()), default=0.0)
    if rtol is not None or atol is not None:
        return (atol or 0.0) + (rtol or 0.0) * scale
    dtype = next((t.dtype for outputs in reference for t in outputs if t.is_floating_point()), torch.float32)
    floor = 16 * torch.finfo(dtype).eps * scale
    try:
        wide = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            exact = [_outputs(_call(wide, _double(batch))) for batch in batches]
    except (RuntimeError, TypeError):  # a model that cannot run in float64: the floor alone
        return 1e3 * floor
    roundoff = max(
        ((a.double() - b).abs().max().item() for r, e in zip(reference, exact) for a, b in zip(r, e) if a.numel()),
        default=0.0,
    )
    return 10 * roundoff + floor


def _drawn_like(inputs: Inputs) -> list[Inputs]:
    """Two check batches: the example perturbed, and one drawn like it (same spread, or ids in the same range)."""
    generator = torch.Generator().manual_seed(0)

    def perturbed(x: Tensor) -> Tensor:
        if x.is_floating_point():
            noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
            return x + 0.1 * x.std().nan_to_num(1.0) * noise
        if x.dtype == torch.bool or x.numel() == 0:
            return x
        low, high = int(x.min()), int(x.max()) + 1
        replace = torch.rand(x.shape, generator=generator) < 0.25
        fresh = torch.randint(low, high, x.shape, generator=generator, dtype=x.dtype)
        return torch.where(replace.to(x.device), fresh.to(x.device), x)

    def drawn(x: Tensor) -> Tensor:
        if x.is_floating_point():
            over = 0 if x.ndim > 1 and x.shape[0] > 1 else None
            mean = x.mean(dim=over, keepdim=True) if over is not None else x.mean()
            spread = x.std(dim=over, keepdim=True) if over is not None else x.std()
            noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
            return mean + spread.nan_to_num(1.0) * noise
        if x.dtype == torch.bool or x.numel() == 0:
            return x
        low, high = int(x.min()), int(x.max()) + 1
        return torch.randint(low, high, x.shape, generator=generator, dtype=x.dtype).to(x.device)

    return [_map(inputs, perturbed), _map(inputs, drawn)]


def _map(inputs: Inputs, fn: Callable[[Tensor], Tensor]) -> Inputs:
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: fn(v) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    return type(inputs)(fn(v) if isinstance(v, Tensor) else v for v in inputs)  # type: ignore[call-arg]


def _double(inputs: Inputs) -> Inputs:
    return _map(inputs, lambda x: x.double() if x.is_floating_point() else x)


def _call(model: nn.Module, inputs: Inputs) -> Any:
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def _tuple(inputs: Inputs) -> Any:
    return inputs if isinstance(inputs, (Tensor, Mapping)) else tuple(inputs)


def _outputs(output: Any) -> list[Tensor]:
    """The tensors of a model's output (a tensor, a tuple, a dict or a Hugging Face ``ModelOutput``), in order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in _outputs(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in _outputs(value)]
    return []


def _inputs_of(model: nn.Module, inputs: Inputs, modules: set[nn.Module]) -> dict[nn.Module, Tensor]:
    """The input each of ``modules`` receives on one forward pass of ``inputs``."""
    seen: dict[nn.Module, Tensor] = {}
    if not modules:
        return seen
    handles = [m.register_forward_pre_hook(lambda m, args: seen.__setitem__(m, args[0])) for m in modules]
    try:
        with torch.no_grad():
            _call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _may_be_constant(layer: nn.Module) -> bool:
    return bool(layer.weight.detach().flatten(1).eq(0).all(dim=1).any())


def _zero_batchnorm_scale(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and bool(m.weight.detach().eq(0).any())
        for m in model.modules()
    )


def _macs(model: nn.Module, inputs: Inputs) -> int:
    """Multiply-accumulates of one forward pass (torch-pruning's count), or 0 when it cannot count this model."""
    try:
        import torch_pruning as tp

        return int(tp.utils.count_ops_and_params(model, _tuple(inputs))[0])
    except Exception:  # noqa: BLE001 - a count is a nicety: models it cannot trace still shrink
        return 0
