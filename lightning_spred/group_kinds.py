"""The kinds of groups a penalised weight can be split into, in one table, with their checks.

A group shares one spred factor, so the penalty on it is the group lasso ``lam * ||w_g||_2`` and it becomes zero
as a whole. ``groups={"pattern": kind}`` takes one of:

- ``"input"``: dimension 1, the input features of a ``Linear`` (feature selection) or the input channels of a conv;
- ``"output"``: dimension 0, the neurons of a ``Linear`` or the filters of a conv;
- ``"channel"``: dimension 0 together with the layer's bias and the BatchNorm registered right after it (see
  :mod:`lightning_spred.channels`), so that a zero group outputs exactly zero and :func:`~lightning_spred.shrink`
  can remove it;
- an integer: that dimension of any parameter with at least two dimensions;
- ``None``: elementwise L1 (no groups).

A new kind is one row of :data:`KINDS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from torch import nn

__all__ = ["KINDS", "GroupKind", "GroupSpec", "check_group_spec", "resolve_group_kind"]


@dataclass(frozen=True)
class GroupKind:
    """One kind of group.

    Attributes:
        dim: the dimension whose indices are the groups.
        channel: the groups also take the layer's bias and the BatchNorm after it.
        meaning: what a group is, for messages and documentation.
    """

    dim: int
    channel: bool
    meaning: str


KINDS: dict[str, GroupKind] = {
    "input": GroupKind(1, False, "dim 1: input features of a Linear, input channels of a conv"),
    "output": GroupKind(0, False, "dim 0: neurons of a Linear, filters of a conv"),
    "channel": GroupKind(0, True, "dim 0 with the layer's bias and the BatchNorm after it"),
}

#: A group specification: a name of :data:`KINDS`, a dimension index, or ``None`` for elementwise L1. The
#: ``Literal`` lets argument parsers (LightningCLI) refuse an unknown name at parse time.
GroupSpec = Union[None, int, Literal["input", "output", "channel"]]


def _choices() -> str:
    names = ", ".join(f"'{name}' ({kind.meaning})" for name, kind in KINDS.items())
    return f"None for elementwise L1, {names}, or a dimension index"


def check_group_spec(spec: object, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` unless ``spec`` is a valid group specification (without a model).

    Example:
        >>> check_group_spec("rows", "`groups['net.0.weight']`")
        Traceback (most recent call last):
        ...
        ValueError: `groups['net.0.weight']` is 'rows': use None for elementwise L1, 'input' (dim 1: ...
    """
    if spec is None or (isinstance(spec, str) and spec in KINDS):
        return
    if isinstance(spec, int) and not isinstance(spec, bool):
        return
    raise ValueError(f"{where} is {spec!r}: use {_choices()}.")


def resolve_group_kind(spec: GroupSpec, module: nn.Module, attr: str, name: str) -> Optional[GroupKind]:
    """The group kind of ``spec`` for one parameter (``None``: elementwise), checked against the parameter.

    Args:
        spec: the specification given for the parameter.
        module: the module that owns the parameter.
        attr: the parameter's attribute name on ``module`` (``"weight"``).
        name: its name in the model, for messages.

    Raises:
        ValueError: the dimension does not exist for this parameter, or ``"channel"`` is given for a parameter that
            is not the ``weight`` of a layer with output channels.
    """
    if spec is None:
        return None
    if not (isinstance(spec, str) and spec in KINDS or isinstance(spec, int) and not isinstance(spec, bool)):
        raise ValueError(f"Group {spec!r} does not fit `{name}`: use {_choices()}.")
    kind = KINDS[spec] if isinstance(spec, str) else GroupKind(int(spec), False, f"dim {spec}")
    ndim = module._parameters[attr].ndim  # type: ignore[union-attr]
    if ndim < 2 or not -ndim <= kind.dim < ndim:
        raise ValueError(
            f"Group {spec!r} does not fit `{name}` ({ndim} dimensions): groups need a parameter with at least 2"
            f" dimensions and an existing dimension. Use {_choices()}."
        )
    if kind.channel and (
        attr != "weight" or not hasattr(module, "out_channels") and not hasattr(module, "out_features")
    ):
        raise ValueError(
            f"Group 'channel' does not fit `{name}`: it groups the output channels of a Linear or conv `weight` with"
            " their bias and BatchNorm. Use 'output' for other parameters."
        )
    return GroupKind(kind.dim % ndim, kind.channel, kind.meaning)
