"""Channel groups: a filter, its bias and the normalisation of its channel, zeroed together.

A penalty on a conv filter that a BatchNorm follows is degenerate: the normalisation undoes the filter's scale,
so the filter shrinks without the channel going away (the penalty is "absorbed"). Network slimming penalises the
BatchNorm's scale instead. A channel group ties everything that makes channel ``c``'s output: the weight's output
unit ``c``, ``bias[c]`` and the normalisation's ``weight[c]`` (scale) and ``bias[c]`` (shift). One shared factor per
channel gives the group lasso over these tensors, and a channel whose group is zero outputs exactly zero
(``BN(0) = 0`` with zero scale and shift), so :func:`lightning_spred.shrink` removes it without changing the
network's function.

The normalisation of a layer is found by the model's structure, without running it: the ``BatchNorm`` registered
right after the layer in the same parent module, with as many features as the layer has output channels
(``nn.Sequential(conv, bn, relu)``, torchvision's ``conv1``/``bn1``, ``downsample = Sequential(conv, bn)``).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_spred.layouts import layout_of
from lightning_spred.trace import BATCH_NORMS

__all__ = ["channel_slices", "norm_registered_after"]


def norm_registered_after(model: nn.Module, path: str) -> Optional[tuple[str, nn.Module]]:
    """The BatchNorm registered right after the module at ``path`` in its parent, over its output channels."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    module = parent.get_submodule(name)
    names = list(parent._modules)
    following = names[names.index(name) + 1] if names.index(name) + 1 < len(names) else None
    candidate = parent._modules.get(following) if following is not None else None
    layout = layout_of(module, "weight")
    channels = None if layout is None else module.weight.shape[layout.output]
    if isinstance(candidate, BATCH_NORMS) and candidate.num_features == channels:
        return (f"{parent_path}.{following}" if parent_path else following), candidate  # type: ignore[return-value]
    return None


def channel_slices(model: nn.Module, path: str, module: nn.Module) -> list[tuple[nn.Module, str, str, int]]:
    """The tensors of the output channels of ``module`` (at ``path``) as ``(module, attr, name, dim)``: its weight
    (along its layout's output dimension), its bias, and its BatchNorm's scale and shift."""
    layout = layout_of(module, "weight")
    assert layout is not None, "channel groups are resolved for layers of a known layout"
    parts = [(module, "weight", f"{path}.weight", layout.output)]
    if getattr(module, "bias", None) is not None:
        parts.append((module, "bias", f"{path}.bias", 0))
    norm = norm_registered_after(model, path)
    if norm is not None and norm[1].affine:
        norm_path, bn = norm
        parts += [(bn, "weight", f"{norm_path}.weight", 0), (bn, "bias", f"{norm_path}.bias", 0)]
    return parts
