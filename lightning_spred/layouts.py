"""Where a layer keeps its output units and its input features: the storage layout of its projection weights.

``nn.Linear`` stores ``(out_features, in_features)``, Hugging Face's ``Conv1D`` (GPT-2's projections) the transpose
``(in, out)``, a transposed convolution ``(in_channels, out_channels / groups, *kernel)``. A group kind means the same
units whatever the layout (``"input"``: features in, ``"output"``: neurons or filters out), so it is resolved here,
from the layer's type, never assumed. A parameter whose layout is not known gets named kinds refused, with the fix.

Hugging Face's ``Conv1D`` is recognised without importing ``transformers``: a model that holds one has imported it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from torch import nn

__all__ = ["HFConv1D", "Layout", "hf_conv1d", "is_projection", "layout_of", "module_types", "projection_attrs"]

#: The bare projection parameters of ``nn.MultiheadAttention`` (PyTorch's ``nn.TransformerEncoder`` uses them through
#: ``F.multi_head_attention_forward``): ``in_proj_weight`` holds q, k and v stacked, or ``q/k/v_proj_weight`` apart.
ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True)
class Layout:
    """The dimensions of a weight that index its output units and its input features.

    Attributes:
        output: the dimension of the output units (neurons of a ``Linear``, filters of a conv).
        input: the dimension of the input features (``None`` when no dimension holds them whole: a grouped conv).
    """

    output: int
    input: Optional[int]


def hf_conv1d() -> Optional[type[nn.Module]]:
    """Hugging Face's ``Conv1D`` class if ``transformers`` is loaded (else no model can hold one)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def layout_of(module: nn.Module, attr: str) -> Optional[Layout]:
    """The layout of ``module``'s parameter ``attr``, or ``None`` when it is not a projection of a known layer.

    Example:
        >>> layout_of(nn.Linear(3, 2), "weight")
        Layout(output=0, input=1)
        >>> layout_of(nn.ConvTranspose2d(3, 2, 3), "weight")
        Layout(output=1, input=0)
        >>> layout_of(nn.Embedding(10, 4), "weight") is None
        True
    """
    if isinstance(module, nn.MultiheadAttention):
        return Layout(0, 1) if attr in ATTENTION_PROJECTIONS else None
    if attr != "weight":
        return None
    conv1d = hf_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return Layout(1, 0)  # x @ W + b: W is (in, out)
    if isinstance(module, nn.Linear):
        return Layout(0, 1)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return Layout(1, 0 if module.groups == 1 else None)
    if isinstance(module, nn.modules.conv._ConvNd):
        return Layout(0, 1 if module.groups == 1 else None)
    return None


def projection_attrs(module: nn.Module) -> tuple[str, ...]:
    """The names of ``module``'s own projection weights: ``weight``, or the bare projections of an attention."""
    if isinstance(module, nn.MultiheadAttention):
        return tuple(a for a in ATTENTION_PROJECTIONS if module._parameters.get(a) is not None)
    return ("weight",) if module._parameters.get("weight") is not None else ()


def module_types(modules: tuple[type[nn.Module], ...]) -> tuple[type[nn.Module], ...]:
    """``modules`` with the placeholder :class:`HFConv1D` replaced by Hugging Face's ``Conv1D`` (when it is loaded)."""
    types = tuple(m for m in modules if m is not HFConv1D)
    conv1d = hf_conv1d() if HFConv1D in modules else None
    return types + (conv1d,) if conv1d is not None else types


def is_projection(module: nn.Module, attr: str, modules: tuple[type[nn.Module], ...]) -> bool:
    """Whether ``attr`` is a projection weight of ``module`` and ``module`` is one of ``modules``."""
    return attr in projection_attrs(module) and isinstance(module, module_types(modules))


class HFConv1D(nn.Module):
    """Stands for Hugging Face's ``transformers.pytorch_utils.Conv1D`` in a list of module types, without importing
    ``transformers`` (GPT-2's projections: ``x @ W + b``, weight ``(in, out)``)."""

    def __init__(self) -> None:  # pragma: no cover - a placeholder, never built
        raise TypeError("HFConv1D stands for transformers' Conv1D in `modules=`; it is not a layer.")
