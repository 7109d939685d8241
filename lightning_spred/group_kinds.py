"""The kinds of groups a penalty can zero whole, in one table, with their checks.

A group shares one spred factor, so the penalty on it is the group lasso ``lam * ||w_g||_2`` and it becomes zero
as a whole. ``groups={"pattern": kind}`` takes one of:

- ``"input"``: the input features of a layer (columns of a ``Linear``, input channels of a conv): feature selection;
- ``"output"``: the output units of a layer (neurons of a ``Linear``, filters of a conv);
- ``"channel"``: the output units together with the layer's bias and the BatchNorm registered right after it (see
  :mod:`lightning_spred.channels`), so that a zero group outputs exactly zero and :func:`~lightning_spred.shrink`
  can remove it;
- ``"head"``, ``"neuron"``, ``"rank"``: units that span several tensors (:mod:`lightning_spred.units`): the pattern
  names a *module*, an attention, a feed-forward block or a LoRA layer, and each of its heads, neurons or ranks is one
  group over all the tensors that make it;
- an integer: that dimension of any parameter with at least two dimensions;
- ``None``: elementwise L1 (no groups).

``"input"``, ``"output"`` and ``"channel"`` mean the same units whatever the layer's storage layout (Hugging Face's
``Conv1D`` stores ``(in, out)``, see :mod:`lightning_spred.layouts`); a parameter whose layout is not known takes an
integer dimension. A new kind is one row of :data:`KINDS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from torch import nn

from lightning_spred.layouts import layout_of

__all__ = ["KINDS", "GroupKind", "GroupSpec", "check_group_spec", "group_dim", "is_unit_kind"]


@dataclass(frozen=True)
class GroupKind:
    """One kind of group.

    Attributes:
        meaning: what a group is, for messages and documentation.
        unit: the pattern names a module whose units span several tensors (see :mod:`lightning_spred.units`).
    """

    meaning: str
    unit: bool = False


KINDS: dict[str, GroupKind] = {
    "input": GroupKind("input features: columns of a Linear, input channels of a conv"),
    "output": GroupKind("output units: neurons of a Linear, filters of a conv"),
    "channel": GroupKind("output units with the layer's bias and the BatchNorm after it"),
    "head": GroupKind("attention heads of a module: rows of q, k, v with columns of the output projection", unit=True),
    "neuron": GroupKind("feed-forward neurons of a module: rows of the up projections, columns of the down one", True),
    "rank": GroupKind("LoRA ranks of a module: rows of lora_A with columns of lora_B", unit=True),
}

#: A group specification: a name of :data:`KINDS`, a dimension index, or ``None`` for elementwise L1. The
#: ``Literal`` lets argument parsers (LightningCLI) refuse an unknown name at parse time.
GroupSpec = Union[None, int, Literal["input", "output", "channel", "head", "neuron", "rank"]]


def _choices() -> str:
    names = ", ".join(f"'{name}' ({kind.meaning})" for name, kind in KINDS.items())
    return f"None for elementwise L1, {names}, or a dimension index"


def check_group_spec(spec: object, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` unless ``spec`` is a valid group specification (without a model).

    Example:
        >>> check_group_spec("rows", "`groups['net.0.weight']`")
        Traceback (most recent call last):
        ...
        ValueError: `groups['net.0.weight']` is 'rows': use None for elementwise L1, 'input' (input features: ...
    """
    if spec is None or (isinstance(spec, str) and spec in KINDS):
        return
    if isinstance(spec, int) and not isinstance(spec, bool):
        return
    raise ValueError(f"{where} is {spec!r}: use {_choices()}.")


def is_unit_kind(spec: GroupSpec) -> bool:
    """Whether ``spec`` groups the units of a module (heads, neurons, ranks) rather than one parameter."""
    return isinstance(spec, str) and KINDS[spec].unit


def group_dim(spec: Union[int, str], module: nn.Module, attr: str, name: str) -> int:
    """The dimension of parameter ``attr`` of ``module`` (named ``name``) whose indices are the groups of ``spec``.

    Raises:
        ValueError: the dimension does not exist, the layer's layout is not known for a named kind, or ``"channel"``
            is given for a parameter that is not a layer's weight.

    Example:
        >>> group_dim("input", nn.Linear(3, 2), "weight", "fc.weight")
        1
        >>> group_dim("input", nn.Embedding(5, 2), "weight", "embed")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Group 'input' does not fit `embed`: the layout of an Embedding's `weight` is not known. Give ...
    """
    check_group_spec(spec, f"The group of `{name}`")
    ndim = module._parameters[attr].ndim  # type: ignore[union-attr]
    if ndim < 2:
        raise ValueError(
            f"Group {spec!r} does not fit `{name}` ({ndim} dimension): groups need a parameter with at least 2"
            f" dimensions. Use {_choices()}."
        )
    if isinstance(spec, int):
        if not -ndim <= spec < ndim:
            raise ValueError(f"Group {spec!r} does not fit `{name}` ({ndim} dimensions): use {_choices()}.")
        return spec % ndim
    if KINDS[spec].unit:
        raise ValueError(f"Group {spec!r} names modules, not parameters such as `{name}`.")
    if spec == "channel" and attr != "weight":
        raise ValueError(
            f"Group 'channel' does not fit `{name}`: it groups the output units of a layer's `weight` with their bias"
            " and BatchNorm. Use 'output' for other parameters."
        )
    layout = layout_of(module, attr)
    dim = None if layout is None else layout.input if spec == "input" else layout.output
    if dim is None:
        what = (
            "a grouped conv has no dimension of whole input channels"
            if layout is not None
            else (f"the layout of {_article(type(module).__name__)} {type(module).__name__}'s `{attr}` is not known")
        )
        raise ValueError(
            f"Group {spec!r} does not fit `{name}`: {what}. Give the dimension of its groups as an integer"
            f" (`groups={{'{name}': 1}}`)."
        )
    return dim


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"
