"""Choose which parameters of a model spred penalises, with which fixed ``lam`` and which groups.

The rules mirror optax-style masks: by module type (default: the ``weight`` of every ``Linear`` and
``Conv1d/2d/3d``), by name pattern (shell-style, ``*`` also matches dots), or by a function. Patterns
are matched against the names of ``model.named_parameters()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable, Mapping, Optional, Sequence

from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from lightning_spred.group_kinds import GroupKind, GroupSpec, resolve_group_kind

__all__ = ["DEFAULT_MODULES", "PenalisedParameter", "SelectFn", "select_parameters"]

DEFAULT_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

SelectFn = Callable[[str, nn.Module, nn.Parameter], bool]


@dataclass(frozen=True, eq=False)
class PenalisedParameter:
    """A parameter chosen for the penalty.

    Attributes:
        name: its name in ``model.named_parameters()``.
        module: the module that owns it.
        attr: its attribute name on ``module`` (``"weight"``).
        lam: its own fixed coefficient (from ``lam_overrides``), or ``None`` to follow the callback's ``lam``.
        group: ``None`` for elementwise L1, else the kind of its groups (see :mod:`lightning_spred.group_kinds`).
    """

    name: str
    module: nn.Module
    attr: str
    lam: Optional[float]
    group: Optional[GroupKind]

    @property
    def dim(self) -> Optional[int]:
        """The dimension whose indices are the groups (``None``: elementwise)."""
        return None if self.group is None else self.group.dim

    @property
    def parameter(self) -> nn.Parameter:
        return self.module._parameters[self.attr]  # type: ignore[return-value]


def select_parameters(
    model: nn.Module,
    modules: Sequence[type[nn.Module]] = DEFAULT_MODULES,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    select: Optional[SelectFn] = None,
    lam_overrides: Optional[Mapping[str, float]] = None,
    groups: Optional[Mapping[str, GroupSpec]] = None,
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
        groups: name pattern to group kind (see :mod:`lightning_spred.group_kinds`); the first matching pattern wins.

    Raises:
        ValueError: a pattern matches nothing it could, a chosen weight is already parametrised
            (``torch.nn.utils.parametrize``, ``prune``, ``weight_norm``), not yet initialised or has sparse
            gradients, or a group dimension does not exist for its parameter.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> [p.name for p in select_parameters(net)]
        ['0.weight', '2.weight']
        >>> [(p.name, p.lam) for p in select_parameters(net, include=["*.bias"], lam_overrides={"2.*": 0.5})]
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
        for attr, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_path}.{attr}" if module_path else attr
            all_names.append(name)
            if first_match(name, exclude) is not None:
                continue
            if select is not None:
                chosen = bool(select(name, module, param))
            else:
                by_type = attr == "weight" and isinstance(module, tuple(modules))
                by_name = first_match(name, [*include, *groups]) is not None
                chosen = by_name or by_type
            if not chosen:
                continue
            _check_can_factorise(module, param, name)
            override = first_match(name, list(lam_overrides))
            pattern = first_match(name, list(groups))
            group = resolve_group_kind(groups[pattern] if pattern is not None else None, module, attr, name)
            lam = float(lam_overrides[override]) if override else None
            chosen_list.append(PenalisedParameter(name, module, attr, lam, group))

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
