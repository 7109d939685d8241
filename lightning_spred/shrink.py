"""Make a sparse network smaller: remove the neurons and channels whose weights are all zero.

After training with output groups (``groups={"...": "output"}``), whole rows of a ``Linear`` or whole
filters of a conv are exactly zero. Such a unit outputs a constant (its bias, or zero), so removing it,
and the matching inputs of every layer that consumes it, changes nothing once that constant is folded
into the consumers' biases. The dependency tracing (which layers, norms and reshapes share a channel)
is done by `torch-pruning <https://github.com/VainF/Torch-Pruning>`_.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["ShrinkResult", "shrink"]

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# These normalise across channels, so removing even a constant channel changes every other output.
_CROSS_CHANNEL = (nn.LayerNorm, nn.GroupNorm)


@dataclass
class ShrinkResult:
    """What :func:`shrink` did.

    Attributes:
        model: the smaller model (a copy: the model passed in is not changed).
        removed: layer name to the number of output neurons or channels removed.
        skipped: layer name to the reason its zero units were kept.
    """

    model: nn.Module
    removed: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def shrink(
    model: nn.Module,
    example_inputs: Union[Tensor, Sequence[Any]],
    layers: Optional[Sequence[str]] = None,
    atol: float = 1e-5,
) -> ShrinkResult:
    """Return a copy of ``model`` without the output neurons/channels whose weights are exactly zero.

    Constant outputs of removed units are folded into the biases of the layers that consume them, so the
    copy computes the same function (checked on ``example_inputs`` in eval mode). A layer is left as it is,
    with the reason in :attr:`ShrinkResult.skipped`, when that cannot be exact: a consumer without a bias,
    a padded convolution consuming a nonzero constant, or a ``LayerNorm``/``GroupNorm`` on the channel.

    Args:
        model: a trained model (for example the one ``SpredCallback`` returns).
        example_inputs: a batch the model accepts, used to trace the graph and to check the result.
        layers: names of the ``Linear``/``Conv`` layers to shrink (default: all).
        atol: largest output difference allowed by the final check.

    Raises:
        ImportError: ``torch-pruning`` is not installed.
        RuntimeError: the smaller model's outputs differ from the original's by more than ``atol``.
    """
    try:
        import torch_pruning as tp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("shrink needs torch-pruning: `pip install lightning-spred[prune]`.") from error

    small = copy.deepcopy(model).eval()
    inputs = example_inputs if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    graph = tp.DependencyGraph().build_dependency(small, example_inputs=inputs)  # traces with autograd
    with torch.no_grad():
        reference = _call(small, inputs)
        result = ShrinkResult(small)
        for name, layer in list(small.named_modules()):
            if not isinstance(layer, _PRUNABLE) or (layers is not None and name not in layers):
                continue
            dead = (layer.weight.flatten(1).abs().sum(dim=1) == 0).nonzero().flatten().tolist()
            if not dead or len(dead) == layer.weight.shape[0]:
                continue  # nothing to remove, or the whole layer: removing every unit would break the graph
            out_channels = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
            group = graph.get_pruning_group(layer, out_channels, idxs=dead)
            reason = _fold_constants(small, inputs, group)
            if reason is not None:
                result.skipped[name] = reason
                continue
            group.prune()
            result.removed[name] = len(dead)
        difference = (_call(small, inputs) - reference).abs().max().item()
    if difference > atol:
        raise RuntimeError(f"The shrunk model's outputs differ by {difference:.3g} > atol={atol}: please report this.")
    return result


def _call(model: nn.Module, inputs: Union[Tensor, tuple]) -> Tensor:
    return model(inputs) if isinstance(inputs, Tensor) else model(*inputs)


def _fold_constants(model: nn.Module, inputs: Union[Tensor, tuple], group: Any) -> Optional[str]:
    """Add the removed units' constant contributions to the consumers' biases; return why not, if it cannot."""
    consumers = []
    for dep, idxs in group:
        module = dep.target.module
        if isinstance(module, _CROSS_CHANNEL):
            return f"{type(module).__name__} normalises across the removed channels"
        if isinstance(module, _PRUNABLE) and getattr(dep.handler, "__name__", "") == "prune_in_channels":
            consumers.append((module, list(idxs)))
    seen: dict[nn.Module, Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda m, args: seen.__setitem__(m, args[0])) for m, _ in consumers]
    try:
        _call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()

    additions = []
    for module, idxs in consumers:
        channel_dim = -1 if isinstance(module, nn.Linear) else 1
        values = seen[module].movedim(channel_dim, -1)[..., idxs].reshape(-1, len(idxs))
        constant = values[0]
        if not torch.equal(values, constant.expand_as(values)):
            return "the removed units do not reach their consumers as constants"
        if not constant.any():
            continue
        if module.bias is None:
            return f"a consumer ({type(module).__name__}) has no bias to take the removed units' constant output"
        if not isinstance(module, nn.Linear) and (_padded(module) or module.groups != 1):
            return "a padded or grouped convolution consumes the removed units' nonzero constant output"
        weight = module.weight[:, idxs]
        contribution = weight.flatten(2).sum(dim=2) @ constant if weight.ndim > 2 else weight @ constant
        additions.append((module.bias, contribution))
    for bias, contribution in additions:
        bias.add_(contribution)
    return None


def _padded(conv: nn.Module) -> bool:
    padding = conv.padding
    return padding != "valid" if isinstance(padding, str) else any(p != 0 for p in padding)
