"""Removing attention heads, feed-forward neurons and LoRA ranks whose contribution is zero, proved from the weights.

A unit (:mod:`lightning_spred.units`) contributes nothing, whatever the input, when

- a head's columns of the output projection are zero, or its value rows and value bias are (attention averages zero
  vectors); with its value rows zero and a value bias, the head outputs that bias at every position, which folds into
  the output projection's bias;
- a neuron's column of the down projection is zero, or its rows of every up projection are (the down projection then
  receives the activation of the up biases at every position: a constant, folded into the down projection's bias);
- a LoRA rank's row of ``lora_A`` or column of ``lora_B`` is zero (``B @ A`` is a sum of rank-one terms).

Such units are cut out of every tensor of the unit, and the modules' sizes (``num_heads``, ``in_features``, ...) are
updated the way Hugging Face's and timm's code reads them. ``nn.MultiheadAttention`` cannot run with fewer heads than
its embedding width gives, so its zero heads stay (and are named).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from lightning_spred.layouts import hf_conv1d, layout_of
from lightning_spred.units import Slice, Units

__all__ = ["UnitRemoval", "plan_removal"]


@dataclass
class UnitRemoval:
    """Which units of one module go, and the constants their removal leaves behind.

    Attributes:
        units: the module's units.
        removed: indices of the units that go.
        folds: ``(output projection or down projection, its bias, the amount)`` added when the units go.
        reason: why some units with a zero part stay, if any.
    """

    units: Units
    removed: list[int]
    folds: list[tuple[Tensor, Tensor]]
    reason: Optional[str] = None

    @torch.no_grad()
    def apply(self) -> None:
        """Fold the constants and cut the units out of every tensor, updating the modules' sizes."""
        for bias, amount in self.folds:
            bias.add_(amount)
        keep = [i for i in range(self.units.count) if i not in set(self.removed)]
        for part in self.units.slices:
            _cut(part, keep)
        _update_counts(self.units, len(keep))


def plan_removal(units: Units, down_inputs: dict[nn.Module, Tensor]) -> Optional[UnitRemoval]:
    """The units of ``units`` whose contribution is zero or folds into a bias (``None``: none).

    Args:
        units: a module's heads, neurons or ranks.
        down_inputs: the input each down projection received on one batch (for the constant a neuron whose up rows
            are zero passes on: constant by the weights, read here).
    """
    if units.kind == "head":
        plan = _heads(units)
    elif units.kind == "neuron":
        plan = _neurons(units, down_inputs)
    else:
        zero = _zero(units, "a") | _zero(units, "b")
        plan = UnitRemoval(units, _indices(zero), [])
    if plan is None or not (plan.removed or plan.reason):
        return None
    if plan.removed and len(plan.removed) == units.count:
        plan.reason = f"every {units.kind} of `{units.name}` is zero: removing all of them would leave no module"
        plan.removed, plan.folds = [], []
    return plan


def _heads(units: Units) -> Optional[UnitRemoval]:
    out_zero = _zero(units, "o")
    value_zero = _zero(units, "v", weights=True)
    bias_zero = _zero(units, "v", biases=True)
    silent = out_zero | (value_zero & bias_zero)
    constant = value_zero & ~bias_zero & ~out_zero
    if not bool((silent | constant).any()):
        return None
    if isinstance(units.module, nn.MultiheadAttention):
        return UnitRemoval(
            units, [], [], f"`{units.name}` (nn.MultiheadAttention) needs q, k and v as wide as its input"
        )
    folds, reason = [], None
    if bool(constant.any()):
        out = next(s for s in units.slices if s.role == "o")
        bias = getattr(out.module, "bias", None)
        if bias is None or any(s.role == "gate" for s in units.slices):
            reason = f"heads of `{units.name}` output their value bias, with no output bias (or a gate) to fold it into"
            constant = torch.zeros_like(constant)
        else:
            values = _value_bias(units)  # (units, per_unit * size): what each unit outputs at every position
            for unit in _indices(constant):
                # the unit's columns of the output projection: after `select`, its width is the dimension `out.dim`
                columns = _view(out).select(out.dim, unit)
                folds.append((bias, torch.tensordot(columns, values[unit], dims=([out.dim], [0]))))
    return UnitRemoval(units, _indices(silent | constant), folds, reason)


def _neurons(units: Units, down_inputs: dict[nn.Module, Tensor]) -> Optional[UnitRemoval]:
    """Silent neurons: a zero down column; a zero row of the linear branch of a gated block (``act(gate) * up``, the
    gate first); or up rows that are all zero, whose down input is then a constant: zero (removed), or folded."""
    down = next(s for s in units.slices if s.role == "down")
    ups = list(dict.fromkeys(s.module for s in units.slices if s.role == "up"))  # the gate first when gated
    rows = [_zero(units, "up", weights=True, module=m) & _zero(units, "up", biases=True, module=m) for m in ups]
    weights_only = [_zero(units, "up", weights=True, module=m) for m in ups]
    silent = _zero(units, "down") | (rows[-1] if len(ups) > 1 else torch.zeros_like(rows[0]))
    constant = weights_only[0] & ~silent  # the (gate's) output is its bias: the down input is act(bias) (x up)
    if not bool((silent | constant).any()):
        return None
    folds, reason = [], None
    seen = down_inputs.get(down.module)
    values = seen.reshape(-1, seen.shape[-1]) if seen is not None else None
    bias = getattr(down.module, "bias", None)
    for unit in _indices(constant):
        column = None if values is None else values[:, unit]
        if column is None:
            constant[unit], reason = (
                False,
                f"`{units.name}`'s neurons with zero up rows were not reached by the example",
            )
        elif not bool(column.any()):
            silent[unit] = True  # act(bias) = 0: zero whatever multiplies it
        elif not all(bool(w[unit]) for w in weights_only) or not bool((column == column[0]).all()):
            constant[unit] = False
            reason = f"gated neurons of `{units.name}` pass on act(gate bias) != 0 times a varying up projection"
        elif bias is None:
            constant[unit] = False
            reason = f"neurons of `{units.name}` pass on the activation of their bias, with no down bias to take it"
        else:
            weights = _view(down).movedim(down.dim, 0)[unit]
            folds.append((bias, weights.reshape(bias.shape[0], -1).sum(dim=1) * column[0]))
    return UnitRemoval(units, _indices(silent | constant), folds, reason)


def _zero(
    units: Units, role: str, weights: bool = False, biases: bool = False, module: Optional[nn.Module] = None
) -> Tensor:
    """Per unit: whether every tensor of ``role`` (only weights, or only biases; only ``module``'s) is zero there
    (``True`` where there is none)."""
    result = torch.ones(units.count, dtype=torch.bool)
    for part in units.slices:
        if not (part.role == role or (role == "v" and part.role == "qkv")):
            continue
        if module is not None and part.module is not module:
            continue
        bias = _is_bias(part)
        if (weights and bias) or (biases and not bias):
            continue
        view, dim = _view(part), part.dim
        if part.role == "qkv":  # q, k and v stacked along the dimension before the units: the value is the third
            view, dim = view.select(dim - 1, 2), dim - 1
        nonzero = view.movedim(dim, 0).reshape(units.count, -1).ne(0).any(dim=1)
        result &= ~nonzero.cpu()
    return result


def _value_bias(units: Units) -> Tensor:
    """What each unit outputs when its value rows are zero: its value bias, once per query head that reads it,
    ``(units, per_unit * size)``."""
    part = next(s for s in units.slices if _is_bias(s) and s.role in ("v", "qkv"))
    view = _view(part)
    view = view.select(part.dim - 1, 2) if part.role == "qkv" else view
    return view.reshape(units.count, -1).repeat(1, units.per_unit)


def _is_bias(part: Slice) -> bool:
    return part.attr.endswith("bias") or part.attr == "bias_v"


def _view(part: Slice) -> Tensor:
    param = part.module._parameters[part.attr]
    return param.detach() if part.shape is None else param.detach().view(part.shape)


def _indices(mask: Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def _cut(part: Slice, keep: list[int]) -> None:
    """Keep only the units ``keep`` of ``part``'s tensor: a new, smaller parameter in its place."""
    module, param = part.module, part.module._parameters[part.attr]
    assert param is not None
    view = param.detach().view(part.shape) if part.shape is not None else param.detach()
    kept = view.index_select(part.dim, torch.tensor(keep, device=param.device, dtype=torch.long))
    shape = list(param.shape)
    axis = _param_dim(tuple(param.shape), tuple(view.shape), part.dim)
    shape[axis] = shape[axis] * len(keep) // view.shape[part.dim]
    module._parameters[part.attr] = nn.Parameter(kept.reshape(shape).clone(), requires_grad=param.requires_grad)
    _sync_sizes(module)


def _param_dim(shape: tuple[int, ...], view: tuple[int, ...], dim: int) -> int:
    """The dimension of ``shape`` that dimension ``dim`` of its contiguous view ``view`` splits."""
    stride = 1
    for d in range(len(view) - 1, dim, -1):
        stride *= view[d]
    inner = 1
    for axis in range(len(shape) - 1, -1, -1):
        if inner <= stride < inner * shape[axis]:
            return axis
        inner *= shape[axis]
    raise AssertionError(f"the view {view} does not split {shape}")


def _sync_sizes(module: nn.Module) -> None:
    """A layer's size attributes after its weight changed shape."""
    layout = layout_of(module, "weight")
    weight = getattr(module, "weight", None)
    if layout is None or not isinstance(weight, Tensor):
        return
    outputs, inputs = weight.shape[layout.output], weight.shape[layout.input] if layout.input is not None else None
    conv1d = hf_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        module.nf, module.nx = outputs, inputs
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = outputs, inputs  # type: ignore[assignment]
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = outputs
        module.in_channels = inputs * module.groups if inputs is not None else module.in_channels


def _update_counts(units: Units, kept: int) -> None:
    """Head counts and widths that Hugging Face and timm attention read in ``forward``."""
    if units.kind != "head":
        return
    for module in (units.module, getattr(units.module, "self", None), getattr(units.module, "attention", None)):
        if not isinstance(module, nn.Module):
            continue
        counts = [getattr(module, a, None) for a in ("num_heads", "num_attention_heads")]
        heads = next((n for n in counts if isinstance(n, int)), None)
        if heads is None:
            continue
        width = kept * units.per_unit
        for attr in ("all_head_size", "attn_dim", "split_size"):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, getattr(module, attr) // heads * width)
        for attr in ("num_heads", "num_attention_heads"):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, width)
