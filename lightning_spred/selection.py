"""Choose which parameters of a model spred penalises, with which ``lam`` and which groups.

The rules mirror optax-style masks: by module type (default: the ``weight`` of every ``Linear`` and
``Conv1d/2d/3d``), by name pattern (shell-style, ``*`` also matches dots), or by a function. Patterns
are matched against the names of ``model.named_parameters()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable, Mapping, Optional, Sequence, Union

from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

__all__ = ["DEFAULT_MODULES", "GroupDim", "PenalisedParameter", "check_group_spec", "select_parameters"]

DEFAULT_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: A group specification: ``None`` (elementwise), a dimension index, ``"input"`` (dim 1: input
#: features of a Linear, input channels of a conv), ``"output"`` (dim 0: neurons, filters) or ``"channel"``
#: (output channels together with their bias and the BatchNorm after them, see :mod:`lightning_spred.channels`).
GroupDim = Union[None, int, str]
_NAMED_DIMS = {"input": 1, "output": 0, "channel": 0}

SelectFn = Callable[[str, nn.Module, nn.Parameter], bool]


@dataclass(frozen=True, eq=False)
class PenalisedParameter:
    """A parameter chosen for the penalty.

    Attributes:
        path: its name in ``model.named_parameters()``.
        module: the module that owns it.
        name: its attribute name on ``module``.
        lam: its own fixed coefficient (from ``lam_overrides``), or ``None`` to follow the callback's ``lam``.
        dim: ``None`` for elementwise L1, else the dimension whose indices are the groups.
        channel: its output channels are grouped with their bias and normalisation (``"channel"`` groups).
    """

    path: str
    module: nn.Module
    name: str
    lam: Optional[float]
    dim: Optional[int]
    channel: bool = False


def check_group_spec(spec: GroupDim, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` unless ``spec`` is a valid group specification."""
    valid = spec is None or spec in _NAMED_DIMS or (isinstance(spec, int) and not isinstance(spec, bool))
    if not valid:
        raise ValueError(
            f"{where} is {spec!r}: use None for elementwise L1, 'input' (dim 1: input features or channels),"
            " 'output' (dim 0: neurons or filters) or a dimension index."
        )


def select_parameters(
    model: nn.Module,
    modules: Sequence[type[nn.Module]] = DEFAULT_MODULES,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    select: Optional[SelectFn] = None,
    lam_overrides: Optional[Mapping[str, float]] = None,
    groups: Optional[Mapping[str, GroupDim]] = None,
) -> list[PenalisedParameter]:
    """Return the parameters of ``model`` to penalise, in ``named_parameters`` order.

    A parameter is chosen if it is not excluded and either ``select(path, module, param)`` is true (when
    ``select`` is given, it alone decides) or it is the ``weight`` of one of ``modules`` or its name matches a
    pattern in ``include`` or ``groups``. A tied parameter is chosen once, under its first name. Frozen
    parameters are chosen too: they are penalised only while they train.

    Args:
        model: the model to search.
        modules: module types whose ``weight`` is penalised.
        include: name patterns of further parameters to penalise.
        exclude: name patterns of parameters never penalised.
        select: a function ``(path, module, parameter) -> bool`` that replaces ``modules`` and ``include``.
        lam_overrides: name pattern to a fixed ``lam``; the first matching pattern wins.
        groups: name pattern to group dimension (see :data:`GroupDim`); the first matching pattern wins.

    Raises:
        ValueError: a pattern matches nothing it could, a chosen weight is already parametrised
            (``torch.nn.utils.parametrize``, ``prune``, ``weight_norm``), not yet initialised or has sparse
            gradients, or a group dimension does not exist for its parameter.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> [p.path for p in select_parameters(net)]
        ['0.weight', '2.weight']
        >>> [(p.path, p.lam) for p in select_parameters(net, include=["*.bias"], lam_overrides={"2.*": 0.5})]
        [('0.weight', None), ('0.bias', None), ('2.weight', 0.5), ('2.bias', 0.5)]
    """
    lam_overrides = dict(lam_overrides or {})
    groups = dict(groups or {})
    used_patterns: set[str] = set()

    def first_match(path: str, patterns: Sequence[str]) -> Optional[str]:
        for pattern in patterns:
            if fnmatchcase(path, pattern):
                used_patterns.add(pattern)
                return pattern
        return None

    chosen_list: list[PenalisedParameter] = []
    all_names: list[str] = []
    seen: set[int] = set()
    for module_path, module in model.named_modules():
        wrapped = _parametrised_weight(module, module_path, modules if select is None else ())
        if wrapped is not None and first_match(wrapped, exclude) is None:
            raise ValueError(_parametrised_message(wrapped))
        for name, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            path = f"{module_path}.{name}" if module_path else name
            all_names.append(path)
            if first_match(path, exclude) is not None:
                continue
            if select is not None:
                chosen = bool(select(path, module, param))
            else:
                by_type = name == "weight" and isinstance(module, tuple(modules))
                by_name = first_match(path, [*include, *groups]) is not None
                chosen = by_name or by_type
            if not chosen:
                continue
            _check_can_factorise(module, param, path)
            override = first_match(path, list(lam_overrides))
            group = first_match(path, list(groups))
            spec = groups[group] if group is not None else None
            dim = _group_dim(spec, param.ndim, path)
            lam = float(lam_overrides[override]) if override else None
            channel = spec == "channel"
            if channel and (
                name != "weight" or not hasattr(module, "out_channels") and not hasattr(module, "out_features")
            ):
                raise ValueError(
                    f"Group 'channel' does not fit `{path}`: it groups the output channels of a Linear or conv"
                    " `weight` with their bias and BatchNorm. Use 'output' for other parameters."
                )
            chosen_list.append(PenalisedParameter(path, module, name, lam, dim, channel))

    unused = [p for p in [*include, *exclude, *lam_overrides, *groups] if p not in used_patterns]
    if unused:
        names = ", ".join(all_names[:40]) + (", ..." if len(all_names) > 40 else "")
        raise ValueError(
            f"The pattern(s) {unused} match no parameter they could apply to. Patterns are shell-style (`*` matches"
            f" dots) and are matched against `named_parameters()` names; the model's parameters are: {names}."
        )
    return chosen_list


def _check_can_factorise(module: nn.Module, param: nn.Parameter, path: str) -> None:
    if isinstance(param, UninitializedParameter):
        raise ValueError(
            f"`{path}` is not initialised yet (a lazy module). Give the module its input size, or run one forward"
            " pass (for example in `setup`) before fitting with SpredCallback."
        )
    if ".parametrizations." in f".{path}":
        raise ValueError(_parametrised_message(path))
    if getattr(module, "sparse", False):
        raise ValueError(
            f"`{path}` gets sparse gradients (`{type(module).__name__}(sparse=True)`), which spred cannot turn into"
            f" factor gradients. Use `sparse=False`, or exclude it with `SpredCallback(..., exclude=['{path}'])`."
        )


def _parametrised_weight(module: nn.Module, module_path: str, modules: Sequence[type[nn.Module]]) -> Optional[str]:
    """The name of the module's ``weight`` if it would be chosen but is computed by a parametrisation."""
    if not isinstance(module, tuple(modules)) or "weight" in module._parameters:
        return None
    if parametrize.is_parametrized(module) or getattr(module, "weight", None) is not None:
        return f"{module_path}.weight" if module_path else "weight"
    return None


def _parametrised_message(path: str) -> str:
    return (
        f"`{path}` is already parametrised by something else (torch.nn.utils.parametrize, prune or weight_norm),"
        " so spred cannot factorise it. Remove that parametrisation first (for example"
        " `parametrize.remove_parametrizations` or `prune.remove`), or exclude it with"
        f" `SpredCallback(..., exclude=['{path}'])`."
    )


def _group_dim(spec: GroupDim, ndim: int, path: str) -> Optional[int]:
    if spec is None:
        return None
    dim = _NAMED_DIMS.get(spec, spec) if isinstance(spec, str) else spec
    if isinstance(dim, bool) or not isinstance(dim, int) or not -ndim <= dim < ndim or ndim < 2:
        raise ValueError(
            f"Group {spec!r} does not fit `{path}` ({ndim} dimensions). Use None for elementwise L1, 'input' (dim 1),"
            " 'output' (dim 0) or a dimension index of a parameter with at least 2 dimensions."
        )
    return dim % ndim
