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

__all__ = ["DEFAULT_MODULES", "GroupDim", "Target", "select_parameters"]

DEFAULT_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: A group specification: ``None`` (elementwise), a dimension index, ``"input"`` (dim 1: input
#: features of a Linear, input channels of a conv) or ``"output"`` (dim 0: neurons, filters).
GroupDim = Union[None, int, str]
_NAMED_DIMS = {"input": 1, "output": 0}

SelectFn = Callable[[str, nn.Module, nn.Parameter], bool]


@dataclass(frozen=True)
class Target:
    """A parameter chosen for the penalty.

    Attributes:
        path: its name in ``model.named_parameters()``.
        module: the module that owns it.
        name: its attribute name on ``module``.
        lam: its L1 coefficient.
        dim: ``None`` for elementwise L1, else the dimension whose indices are the groups.
    """

    path: str
    module: nn.Module
    name: str
    lam: float
    dim: Optional[int]


def select_parameters(
    model: nn.Module,
    lam: float,
    modules: Sequence[type[nn.Module]] = DEFAULT_MODULES,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    select: Optional[SelectFn] = None,
    lam_overrides: Optional[Mapping[str, float]] = None,
    groups: Optional[Mapping[str, GroupDim]] = None,
) -> list[Target]:
    """Return the parameters of ``model`` to penalise, in ``named_parameters`` order.

    A parameter is chosen if it requires a gradient, is not excluded, and either ``select(path, module, param)``
    is true (when ``select`` is given, it alone decides) or it is the ``weight`` of one of ``modules`` or its
    name matches a pattern in ``include``. A tied parameter is chosen once, under its first name.

    Args:
        model: the model to search.
        lam: the L1 coefficient of parameters without an override.
        modules: module types whose ``weight`` is penalised.
        include: name patterns of further parameters to penalise.
        exclude: name patterns of parameters never penalised.
        select: a function ``(path, module, parameter) -> bool`` that replaces ``modules`` and ``include``.
        lam_overrides: name pattern to ``lam``; the first matching pattern wins.
        groups: name pattern to group dimension (see :data:`GroupDim`); the first matching pattern wins.

    Raises:
        ValueError: a pattern matches no chosen parameter, a chosen weight is already parametrised
            (``torch.nn.utils.parametrize``, ``prune``, ``weight_norm``) or not yet initialised, or a group
            dimension does not exist for its parameter.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> [t.path for t in select_parameters(net, lam=0.1)]
        ['0.weight', '2.weight']
        >>> [(t.path, t.lam) for t in select_parameters(net, 0.1, include=["*.bias"], lam_overrides={"2.*": 0.5})]
        [('0.weight', 0.1), ('0.bias', 0.1), ('2.weight', 0.5), ('2.bias', 0.5)]
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

    targets: list[Target] = []
    seen: set[int] = set()
    for module_path, module in model.named_modules():
        _check_not_parametrised(module, module_path, modules if select is None else (), exclude)
        for name, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            path = f"{module_path}.{name}" if module_path else name
            if select is not None:
                chosen = bool(select(path, module, param))
            else:
                by_type = name == "weight" and isinstance(module, tuple(modules))
                chosen = first_match(path, include) is not None or by_type
            if not chosen or first_match(path, exclude) is not None or not param.requires_grad:
                continue
            if isinstance(param, UninitializedParameter):
                raise ValueError(
                    f"`{path}` is not initialised yet (a lazy module). Run one forward pass, or create it in"
                    " `configure_model`, before fitting with SpredCallback."
                )
            if ".parametrizations." in f".{path}":
                raise ValueError(_parametrised_message(path))
            override = first_match(path, list(lam_overrides))
            group = first_match(path, list(groups))
            dim = _group_dim(groups[group], param.ndim, path) if group is not None else None
            targets.append(Target(path, module, name, float(lam_overrides[override] if override else lam), dim))

    unused = [p for p in [*include, *lam_overrides, *groups] if p not in used_patterns]
    if unused:
        names = ", ".join(t.path for t in targets) or "none"
        raise ValueError(
            f"The pattern(s) {unused} match no penalised parameter. Patterns are shell-style (`*` matches dots)"
            f" and are matched against `named_parameters()` names; penalised parameters are: {names}."
        )
    return targets


def _check_not_parametrised(
    module: nn.Module, module_path: str, modules: Sequence[type[nn.Module]], exclude: Sequence[str]
) -> None:
    if not isinstance(module, tuple(modules)) or "weight" in module._parameters:
        return
    path = f"{module_path}.weight" if module_path else "weight"
    if any(fnmatchcase(path, pattern) for pattern in exclude):
        return
    if parametrize.is_parametrized(module) or getattr(module, "weight", None) is not None:
        raise ValueError(_parametrised_message(path))


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
