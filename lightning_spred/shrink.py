"""Make a sparse network smaller: remove the neurons and channels that output a constant.

After training with output or channel groups (``groups={"...": "output"}`` or ``"channel"``), whole rows of a
``Linear``, whole conv filters, or whole BatchNorm channels are exactly zero. Such a unit outputs a constant: zero
(a channel group: filter, bias, scale and shift all zero), its bias, or the shift of its BatchNorm. Removing it,
and the matching inputs of every layer that consumes it, changes nothing once that constant is folded where it
lands: into the consumers' biases, or into the running mean of the BatchNorm after a consumer without bias (the
ResNet layout). The dependency tracing (which layers, norms, residual additions and reshapes share a channel) is
done by `torch-pruning <https://github.com/VainF/Torch-Pruning>`_; each unit is removed only where that is exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_spred.channels import norm_registered_after

__all__ = ["ShrinkResult", "shrink"]

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# These normalise across channels, so removing even a constant channel changes every other output.
_CROSS_CHANNEL = (nn.LayerNorm, nn.GroupNorm)
_BATCHNORMS = nn.modules.batchnorm._BatchNorm


@dataclass
class ShrinkResult:
    """What :func:`shrink` did.

    Attributes:
        model: the smaller model (a copy, in the mode the input was in: the model passed in is not changed).
        removed: layer name to the number of output neurons or channels removed.
        skipped: layer name to the reason some of its constant units were kept.
        macs: multiply-accumulates of one forward pass on ``example_inputs``, before and after.
        parameters: parameter counts, before and after.
    """

    model: nn.Module
    removed: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    macs: tuple[int, int] = (0, 0)
    parameters: tuple[int, int] = (0, 0)


def shrink(
    model: nn.Module,
    example_inputs: Union[Tensor, Sequence[Any]],
    layers: Optional[Sequence[str]] = None,
    rtol: float = 1e-4,
    atol: float = 1e-6,
) -> ShrinkResult:
    """Return a copy of ``model`` without the output neurons/channels whose output is a constant.

    A unit is removed when its output reaches every consumer as the same constant (checked on
    ``example_inputs`` in eval mode) and that constant can be folded exactly: zero, a consumer's bias, or the
    running mean of the BatchNorm after a consumer without bias. Units that cannot be removed exactly (a padded
    convolution receiving a nonzero constant, a ``LayerNorm``/``GroupNorm`` across the channels, a residual sum
    whose other branch still varies) stay, with the reason in :attr:`ShrinkResult.skipped`. The model's own
    outputs are never removed.

    Args:
        model: a trained model (for example the one ``SpredCallback`` returns).
        example_inputs: a batch the model accepts, used to trace the graph and to check the result.
        layers: names of the ``Linear``/``Conv`` layers to shrink (default: all).
        rtol: relative tolerance of the final check against the original outputs.
        atol: absolute tolerance of that check.

    Raises:
        ImportError: ``torch-pruning`` is not installed.
        RuntimeError: the smaller model's outputs differ from the original's beyond the tolerances.
    """
    try:
        import torch_pruning as tp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("shrink needs torch-pruning: `pip install torch-pruning` (the `prune` extra).") from error

    small = copy.deepcopy(model).eval()
    inputs = example_inputs if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    macs_before, params_before = tp.utils.count_ops_and_params(small, inputs)
    graph = tp.DependencyGraph().build_dependency(small, example_inputs=inputs)  # traces with autograd
    with torch.no_grad():
        reference = _call(small, inputs)
        result = ShrinkResult(small)
        for name, layer in list(small.named_modules()):
            if not isinstance(layer, _PRUNABLE) or (layers is not None and name not in layers):
                continue
            handler = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
            constant = _constant_units(small, name, layer)
            if not constant:
                continue
            group = graph.get_pruning_group(layer, handler, idxs=constant)
            if not any(graph.is_in_channel_pruning_fn(dep.handler) for dep, _ in group):
                result.skipped[name] = "its outputs are the model's outputs"
                continue
            removable, reason = _fold_constants(small, inputs, group, graph, constant)
            if reason is not None:
                result.skipped[name] = reason
            if not removable or len(removable) == layer.weight.shape[0]:
                continue  # nothing exact to remove, or the whole layer: removing every unit would break the graph
            graph.get_pruning_group(layer, handler, idxs=removable).prune()
            result.removed[name] = len(removable)
        output = _call(small, inputs)
    if not torch.allclose(output, reference, rtol=rtol, atol=atol):
        difference = (output - reference).abs().max().item()
        raise RuntimeError(
            f"The shrunk model's outputs differ by up to {difference:.3g} (rtol={rtol}, atol={atol}):"
            " please report this."
        )
    result.macs = (int(macs_before), int(tp.utils.count_ops_and_params(small, inputs)[0]))
    result.parameters = (int(params_before), sum(p.numel() for p in small.parameters()))
    small.train(model.training)
    return result


def _call(model: nn.Module, inputs: Union[Tensor, tuple]) -> Tensor:
    return model(inputs) if isinstance(inputs, Tensor) else model(*inputs)


def _constant_units(model: nn.Module, name: str, layer: nn.Module) -> list[int]:
    """Units of ``layer`` whose output is a constant: a zero weight row, or a zero scale of the BatchNorm after it."""
    constant = layer.weight.flatten(1).abs().sum(dim=1) == 0
    norm = norm_registered_after(model, name) if "." in name or name else None
    if norm is not None and norm[1].affine:
        constant |= norm[1].weight == 0
    return constant.nonzero().flatten().tolist()


def _fold_constants(
    model: nn.Module, inputs: Union[Tensor, tuple], group: Any, graph: Any, units: list[int]
) -> tuple[list[int], Optional[str]]:
    """Fold the units' constant outputs where they land; return the units removed exactly, and why others were not."""
    consumers = []
    for i, (dep, idxs) in enumerate(group):
        module = dep.target.module
        if isinstance(module, _CROSS_CHANNEL):
            return [], f"{type(module).__name__} normalises across the removed channels"
        if isinstance(module, _PRUNABLE) and graph.is_in_channel_pruning_fn(dep.handler):
            # after a flatten, one unit is several inputs: `root_idxs` says which unit each input comes from
            consumers.append((module, list(idxs), list(group[i].root_idxs)))
    seen: dict[nn.Module, Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda m, args: seen.__setitem__(m, args[0])) for m, _, _ in consumers]
    try:
        _call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()

    names = {module: name for name, module in model.named_modules()}
    additions: list[tuple[int, Any, Tensor]] = []  # (unit, where its constant goes, how much)
    keep: dict[int, str] = {}
    for module, idxs, roots in consumers:
        channel_dim = -1 if isinstance(module, nn.Linear) else 1
        values = seen[module].movedim(channel_dim, -1)[..., idxs].reshape(-1, len(idxs))
        for unit in units:
            inputs_of_unit = [j for j, root in enumerate(roots) if root == unit]
            columns = values[:, inputs_of_unit]
            constant = columns[0]
            if not torch.equal(columns, constant.expand_as(columns)):
                keep[unit] = "a unit does not reach its consumers as a constant (another branch still varies)"
                continue
            if not constant.any():
                continue
            target = _absorber(model, names[module], module)
            if target is None:
                keep[unit] = (
                    f"a consumer ({type(module).__name__}) is padded or grouped, or has neither a bias nor a"
                    " BatchNorm after it to take the unit's nonzero constant output"
                )
                continue
            weight = module.weight[:, [idxs[j] for j in inputs_of_unit]]
            per_input = weight.flatten(2).sum(dim=2) if weight.ndim > 2 else weight
            additions.append((unit, target, per_input @ constant))
    removable = [u for u in units if u not in keep]
    for unit, target, contribution in additions:
        if unit not in keep:  # a unit kept for one consumer keeps its output for all of them
            target.add_(contribution)
    return removable, next(iter(keep.values()), None)


def _absorber(model: nn.Module, name: str, consumer: nn.Module) -> Optional[Tensor]:
    """Where a constant input of ``consumer`` can be folded exactly: its bias, or the running mean after it
    (negated: BN subtracts it), if the constant reaches every output position alike."""
    if not isinstance(consumer, nn.Linear) and (_padded(consumer) or consumer.groups != 1):
        return None
    if consumer.bias is not None:
        return consumer.bias
    norm = norm_registered_after(model, name)
    if norm is not None and norm[1].running_mean is not None:
        return _Negated(norm[1].running_mean)
    return None


class _Negated:
    """Adding to it subtracts from the tensor: a constant before a BatchNorm is cancelled by its running mean."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor

    def add_(self, value: Tensor) -> None:
        self.tensor.sub_(value)


def _padded(conv: nn.Module) -> bool:
    padding = conv.padding
    return padding != "valid" if isinstance(padding, str) else any(p != 0 for p in padding)
