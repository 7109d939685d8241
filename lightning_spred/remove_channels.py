"""Removing the output channels (neurons, filters) of plain layers that output a constant, proved from the weights.

torch-pruning's dependency graph says which tensors share a channel: the layer that makes it, the BatchNorm after it,
every other layer that writes the same channel (the branches of a residual sum), and the layers that read it. A channel
is constant, whatever the input, when every layer that writes it does so with a zero filter (its output is its bias),
or straight into a BatchNorm whose scale is zero there (its output is the shift); normalisations, activations, sums
and reshapes of constants are constants. Anything else that writes the channel (a branch that still varies, an
embedding, a raw parameter) leaves it in place, with the reason. The constant is then folded where it lands: into the
consumers' biases, or into the running mean of the BatchNorm after a consumer without bias; a padded or grouped
convolution that receives a nonzero constant keeps the channel. Its value is read off one forward pass, once the
weights have proved that it is the same for every input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from lightning_spred.layouts import layout_of
from lightning_spred.trace import ACROSS_CHANNELS, BATCH_NORMS, NORMS

__all__ = ["ChannelRemoval", "PRUNABLE", "plan_channels"]

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class ChannelRemoval:
    """The output channels of one layer that go, with the constants they leave behind."""

    removed: list[int]
    reason: Optional[str] = None
    folds: list[tuple[Any, Tensor]] = field(default_factory=list)
    prune: Optional[Callable[[], None]] = None

    @torch.no_grad()
    def apply(self) -> None:
        for target, amount in self.folds:
            target.add_(amount)
        if self.prune is not None:
            self.prune()


def plan_channels(model: nn.Module, graph: Any, layer: nn.Module, call: Callable[[], Any]) -> Optional[ChannelRemoval]:
    """The channels of ``layer`` whose output is a constant and can be removed exactly (``None``: it has none).

    Args:
        model: the model (a copy being shrunk).
        graph: torch-pruning's dependency graph of ``model``.
        layer: a ``Linear`` or conv of ``model``.
        call: runs ``model`` once on the example (to read the constants the weights proved constant).
    """
    import torch_pruning as tp

    handler = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
    candidates = _constant_outputs(graph, layer, layer.weight.shape[0])
    if not candidates:
        return None
    group = graph.get_pruning_group(layer, handler, idxs=candidates)
    if not any(graph.is_in_channel_pruning_fn(dep.handler) for dep, _ in group):
        return ChannelRemoval([], "its outputs are the model's outputs")
    for dep, _ in group:
        if isinstance(dep.target.module, ACROSS_CHANNELS):
            return ChannelRemoval([], f"{type(dep.target.module).__name__} normalises across the removed channels")
    proved, reason = _proved_constant(graph, group, candidates)
    if not proved:
        return ChannelRemoval([], reason)
    removable, folds, fold_reason = _fold(graph, group, proved, call)
    reason = reason or fold_reason
    if not removable or len(removable) == layer.weight.shape[0]:
        return ChannelRemoval([], reason) if reason else None  # nothing exact, or the whole layer (breaks the graph)
    return ChannelRemoval(
        removable, reason, folds, lambda: graph.get_pruning_group(layer, handler, idxs=removable).prune()
    )


def _constant_outputs(graph: Any, module: nn.Module, count: int) -> list[int]:
    """Channels of a Linear or conv that are constant by its own weights: a zero filter, or a zero scale of the
    BatchNorm its output goes straight (and only) into."""
    layout = layout_of(module, "weight")
    assert layout is not None
    weight = module.weight.detach().movedim(layout.output, 0).reshape(count, -1)
    constant = weight.eq(0).all(dim=1)
    norm = _only_consumer(graph, module)
    if isinstance(norm, BATCH_NORMS) and norm.affine and norm.weight.shape[0] == count:
        constant |= norm.weight.detach().eq(0)
    return constant.nonzero().flatten().tolist()


def _only_consumer(graph: Any, module: nn.Module) -> Optional[nn.Module]:
    node = graph.module2node.get(module)
    outputs = {id(n.module): n.module for n in node.outputs} if node is not None else {}
    return next(iter(outputs.values())) if len(outputs) == 1 else None


def _proved_constant(graph: Any, group: Any, units: list[int]) -> tuple[list[int], Optional[str]]:
    """The units whose channel every writer makes constant (by the weights), and why the others stay."""
    import torch_pruning as tp

    proved = set(units)
    reason = None
    for item in group:
        module, handler = item.dep.target.module, item.dep.handler
        if not graph.is_out_channel_pruning_fn(handler) or isinstance(module, (tp.ops._ElementWiseOp, *NORMS)):
            continue  # readers, sums, activations and normalisations of constants are constants
        if isinstance(module, (tp.ops._ConcatOp, tp.ops._SplitOp, tp.ops._ReshapeOp, tp.ops._UnbindOp,
                               tp.ops._ExpandOp, tp.ops._SliceOp, nn.PReLU)):  # fmt: skip
            continue
        if not isinstance(module, PRUNABLE):
            for root in item.root_idxs:
                proved.discard(int(root))
            reason = (
                f"its channels are also written by a {type(module).__name__}, which the weights cannot prove constant"
            )
            continue
        constant = set(_constant_outputs(graph, module, module.weight.shape[0]))
        for index, root in zip(item.idxs, item.root_idxs):
            if int(index) not in constant and int(root) in proved:
                proved.discard(int(root))
                reason = (
                    f"another layer ({type(module).__name__}) writes the same channel with a nonzero filter (a residual"
                    " branch that still varies)"
                )
    return sorted(proved), reason


def _fold(
    graph: Any, group: Any, units: list[int], call: Callable[[], Any]
) -> tuple[list[int], list[tuple[Any, Tensor]], Optional[str]]:
    """Where each unit's constant lands: the folds, the units removed exactly, and why others stay."""
    consumers = []
    for item in group:
        module = item.dep.target.module
        if isinstance(module, PRUNABLE) and graph.is_in_channel_pruning_fn(item.dep.handler):
            # after a flatten, one unit is several inputs: `root_idxs` says which unit each input comes from
            consumers.append((module, [int(i) for i in item.idxs], [int(r) for r in item.root_idxs]))
    seen: dict[nn.Module, Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda m, args: seen.__setitem__(m, args[0])) for m, _, _ in consumers]
    try:
        with torch.no_grad():
            call()
    finally:
        for handle in handles:
            handle.remove()
    folds: list[tuple[Any, Tensor, int]] = []
    keep: dict[int, str] = {}
    for module, idxs, roots in consumers:
        channel_dim = -1 if isinstance(module, nn.Linear) else 1
        values = seen[module].movedim(channel_dim, -1)[..., idxs].reshape(-1, len(idxs))
        for unit in units:
            inputs = [j for j, root in enumerate(roots) if root == unit]
            columns = values[:, inputs]
            constant = columns[0]
            if not torch.equal(columns, constant.expand_as(columns)):
                keep[unit] = "a unit does not reach its consumers as the same constant everywhere (a padded pooling)"
                continue
            if not constant.any():
                continue
            target = _absorber(graph, module)
            if target is None:
                keep[unit] = (
                    f"a consumer ({type(module).__name__}) is padded or grouped, or has neither a bias nor a"
                    " BatchNorm after it to take the unit's nonzero constant output"
                )
                continue
            weight = module.weight[:, [idxs[j] for j in inputs]]
            per_input = weight.flatten(2).sum(dim=2) if weight.ndim > 2 else weight
            folds.append((target, per_input @ constant, unit))
    removable = [u for u in units if u not in keep]
    # a unit kept for one consumer keeps its output for all of them
    return removable, [(t, a) for t, a, u in folds if u not in keep], next(iter(keep.values()), None)


def _absorber(graph: Any, consumer: nn.Module) -> Optional[Union[Tensor, _Negated]]:
    """Where a constant input of ``consumer`` can be folded exactly: its bias, or the running mean of the BatchNorm
    its output goes straight into (negated: BN subtracts it), if the constant reaches every output position alike."""
    if not isinstance(consumer, nn.Linear) and (_padded(consumer) or consumer.groups != 1):
        return None
    if consumer.bias is not None:
        return consumer.bias
    norm = _only_consumer(graph, consumer)
    if isinstance(norm, BATCH_NORMS) and norm.running_mean is not None:
        return _Negated(norm.running_mean)
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
