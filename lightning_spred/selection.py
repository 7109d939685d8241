"""Choose which parameters of a model spred penalises, with which fixed ``lam`` and which groups.

The rules mirror optax-style masks: by module type (default: every projection weight, :data:`DEFAULT_MODULES`), by
name pattern (shell-style, ``*`` also matches dots), or by a function. Patterns are matched against every name of a
parameter: a tied weight (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) is one parameter with several
names, chosen once, under the name ``named_parameters()`` gives it first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Callable, Optional, Sequence, Union

from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from lightning_spred.channels import channel_slices
from lightning_spred.checks import check_coefficient
from lightning_spred.group_kinds import GroupSpec, check_group_spec, group_dim, is_unit_kind
from lightning_spred.layouts import HFConv1D, is_projection, module_types
from lightning_spred.units import Units, find_units

__all__ = ["DEFAULT_MODULES", "PenalisedParameter", "SelectFn", "Selection", "select_parameters"]

#: The layers whose projection weights are penalised by default: ``Linear``, ``Conv1d/2d/3d``, the bare projections
#: of ``nn.MultiheadAttention`` (``in_proj_weight`` or ``q/k/v_proj_weight``) and Hugging Face's ``Conv1D`` (GPT-2).
#: Embeddings are not among them, tied to an output layer or not.
DEFAULT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.MultiheadAttention,
    HFConv1D,
)

SelectFn = Callable[[str, nn.Module, nn.Parameter], bool]


@dataclass(frozen=True, eq=False)
class PenalisedParameter:
    """A parameter chosen for the penalty.

    Attributes:
        name: its name in ``model.named_parameters()``.
        module: the module that owns it (for a tied parameter: the owner it was chosen through).
        attr: its attribute name on ``module`` (``"weight"``).
        lam: its own fixed coefficient (from ``lam_overrides``), or ``None`` to follow the callback's ``lam``.
        dim: ``None`` for elementwise L1, else the dimension (of :attr:`shape`) whose indices are its groups.
        shape: the view of the parameter in which ``dim`` indexes the groups (``None``: its own shape).
        term: the penalty term it belongs to: parameters of one term share one factor per group (a channel: filter,
            bias and BatchNorm; an attention's heads). ``None``: a term of its own, named after it.
        aliases: every name of the parameter (``name`` first).
        kind: the kind of its groups (``"input"``, ``"head"``, ...; ``None``: elementwise or a dimension index).
    """

    name: str
    module: nn.Module
    attr: str
    lam: Optional[float]
    dim: Optional[int] = None
    shape: Optional[tuple[int, ...]] = None
    term: Optional[str] = None
    aliases: tuple[str, ...] = ()
    kind: Optional[str] = None

    @property
    def parameter(self) -> nn.Parameter:
        return self.module._parameters[self.attr]  # type: ignore[return-value]

    @property
    def term_name(self) -> str:
        return self.term or self.name


@dataclass
class _Owner:
    name: str
    module: nn.Module
    attr: str


class Selection:
    """Which parameters a :class:`~lightning_spred.SpredCallback` penalises, with their groups and fixed ``lam``.

    A parameter is chosen if no name of it matches ``exclude`` and either ``select(name, module, parameter)`` is true
    (when ``select`` is given, it alone decides) or it is a projection weight of one of ``modules`` or a name of it
    matches a pattern of ``include`` or ``groups``. Frozen parameters are chosen too: they are penalised (and counted)
    only while they train.

    Args:
        modules: module types whose projection weights are penalised (default: :data:`DEFAULT_MODULES`, unless
            ``groups`` is given, in which case only the weights that ``groups`` and ``include`` name are penalised).
            By default a weight that an ``nn.Embedding`` holds is left out, tied to an output layer or not.
        include: name patterns (shell-style, ``*`` matches dots) of further parameters to penalise.
        exclude: name patterns of parameters never penalised.
        select: a function ``(name, module, parameter) -> bool`` that replaces ``modules`` and ``include``.
        lam_overrides: name pattern to a fixed ``lam`` of its own; the first matching pattern wins.
        groups: name pattern to group kind (see :mod:`lightning_spred.group_kinds`); the first matching pattern wins.
            The patterns of ``"head"``, ``"neuron"`` and ``"rank"`` name modules (an attention, a feed-forward
            block, a LoRA layer), the others parameters.

    Raises:
        TypeError, ValueError: an argument is invalid (checked here, before any model is seen).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> [p.name for p in Selection().choose(net)]
        ['0.weight', '2.weight']
        >>> [(p.name, p.dim) for p in Selection(groups={"0.weight": "input"}).choose(net)]
        [('0.weight', 1)]
    """

    def __init__(
        self,
        modules: Optional[Union[type[nn.Module], Sequence[type[nn.Module]]]] = None,
        include: Union[str, Sequence[str]] = (),
        exclude: Union[str, Sequence[str]] = (),
        select: Optional[SelectFn] = None,
        lam_overrides: Optional[Mapping[str, float]] = None,
        groups: Optional[Mapping[str, GroupSpec]] = None,
    ) -> None:
        self.groups = _check_groups(groups if groups is not None else {})
        self.explicit_modules = modules is not None
        self.modules = _check_modules(modules if modules is not None else () if self.groups else DEFAULT_MODULES)
        self.include = _check_patterns("include", include)
        self.exclude = _check_patterns("exclude", exclude)
        if select is not None and not callable(select):
            raise TypeError(f"`select` must be a function (name, module, parameter) -> bool, got {select!r}.")
        if select is not None and self.include:
            raise ValueError("Give either `select` or `include`, not both: `select` alone decides when given.")
        self.select = select
        if lam_overrides is not None and not isinstance(lam_overrides, Mapping):
            raise TypeError(f"`lam_overrides` must map name patterns to numbers, got {lam_overrides!r}.")
        self.lam_overrides = {
            k: check_coefficient(f"lam_overrides[{k!r}]", v) for k, v in (lam_overrides or {}).items()
        }

    def __repr__(self) -> str:
        return (
            f"Selection(modules={[m.__name__ for m in self.modules]}, include={list(self.include)},"
            f" exclude={list(self.exclude)}, groups={self.groups}, lam_overrides={self.lam_overrides})"
        )

    @property
    def unit_kinds(self) -> dict[str, str]:
        """The ``groups`` patterns that name modules (heads, neurons, ranks), with their kind."""
        return {p: kind for p, kind in self.groups.items() if is_unit_kind(kind)}  # type: ignore[misc]

    def hparams(self) -> dict[str, Any]:
        """The settings, for the loggers' hyperparameters and the callback's state key."""
        return {
            "modules": [m.__name__ for m in self.modules],
            "include": list(self.include),
            "exclude": list(self.exclude),
            "groups": dict(self.groups),
        }

    def choose(self, model: nn.Module) -> list[PenalisedParameter]:
        """The parameters of ``model`` to penalise, in ``named_parameters`` order (the tensors of a channel or a unit
        group follow the first of them).

        Raises:
            ValueError: a pattern matches nothing it could apply to; a chosen weight is already parametrised
                (``torch.nn.utils.parametrize``, ``prune``, ``weight_norm``), not yet initialised or has sparse
                gradients; a group does not fit its parameter; a parameter belongs to two groups.
        """
        owners = _owners(model)
        matcher = _Matcher()
        self._refuse_parametrised(model, matcher)
        units = self._units(model, matcher)
        in_unit = {id(s.module._parameters[s.attr]): u for u in units for s in u.slices}
        chosen: list[PenalisedParameter] = []
        taken: dict[int, str] = {}
        for key, names in owners.items():
            aliases = tuple(o.name for o in names)
            param = names[0].module._parameters[names[0].attr]
            if matcher.first(aliases, self.exclude) is not None:
                if key in in_unit:
                    raise ValueError(
                        f"`{aliases[0]}` is excluded but belongs to the {in_unit[key].kind}s of `{in_unit[key].name}`:"
                        " leave that module out of `groups` instead."
                    )
                continue
            if key in taken:
                continue
            if key in in_unit:
                other = matcher.first(aliases, [p for p in self.groups if p not in self.unit_kinds])
                if other is not None:
                    _take(taken, param, f"groups[{other!r}]", owners)
                chosen += self._unit_parameters(in_unit[key], owners, matcher, taken)
                continue
            owner = self._chooses(names, param, matcher)
            if owner is None:
                continue
            chosen += self._parameter(model, owner, aliases, owners, matcher, taken)
        matcher.check_used(self, owners, units)
        return chosen

    # ---------------------------------------------------------------------------------------------- internals
    def _refuse_parametrised(self, model: nn.Module, matcher: _Matcher) -> None:
        """A weight that a parametrisation computes (``parametrize``, ``prune``, ``weight_norm``) and that would be
        chosen by type is refused, not silently left out."""
        if self.select is not None:
            return
        for path, module in model.named_modules():
            name = f"{path}.weight" if path else "weight"
            if (
                "weight" not in module._parameters
                and isinstance(module, module_types(self.modules))
                and (parametrize.is_parametrized(module, "weight") or getattr(module, "weight", None) is not None)
                and matcher.first((name,), self.exclude) is None
            ):
                raise ValueError(_parametrised_message(name))

    def _chooses(self, names: list[_Owner], param: nn.Parameter, matcher: _Matcher) -> Optional[_Owner]:
        """The owner through which the parameter is chosen, or ``None``."""
        if self.select is not None:
            return next((o for o in names if self.select(o.name, o.module, param)), None)
        patterns = [*self.include, *(p for p in self.groups if p not in self.unit_kinds)]
        by_name = next((o for o in names if matcher.first((o.name,), patterns) is not None), None)
        if by_name is not None:
            return by_name
        if not self.explicit_modules and any(isinstance(o.module, nn.Embedding) for o in names):
            return None  # embeddings stay out by default, tied to an output layer or not
        return next((o for o in names if is_projection(o.module, o.attr, self.modules)), None)

    def _parameter(
        self,
        model: nn.Module,
        owner: _Owner,
        aliases: tuple[str, ...],
        owners: dict[int, list[_Owner]],
        matcher: _Matcher,
        taken: dict[int, str],
    ) -> list[PenalisedParameter]:
        """The chosen parameter, with its channel group's bias and BatchNorm when it has one."""
        lam = self._lam(aliases, matcher)
        pattern = matcher.first(aliases, [p for p in self.groups if p not in self.unit_kinds])
        spec = self.groups[pattern] if pattern is not None else None
        if spec is None:
            parts = [(owner.module, owner.attr, aliases[0], None)]
        elif spec == "channel":
            group_dim(spec, owner.module, owner.attr, aliases[0])
            parts = channel_slices(model, owner.name.rpartition(".")[0], owner.module)
        else:
            parts = [(owner.module, owner.attr, aliases[0], group_dim(spec, owner.module, owner.attr, aliases[0]))]
        term = aliases[0] if len(parts) > 1 else None
        chosen = []
        for module, attr, name, dim in parts:
            param = module._parameters[attr]
            _check_can_factorise(module, param, name)
            _take(taken, param, term or name, owners)
            names = tuple(o.name for o in owners[id(param)])
            kind = spec if isinstance(spec, str) else None
            chosen.append(PenalisedParameter(names[0], module, attr, lam, dim, None, term, names, kind))
        return chosen

    def _units(self, model: nn.Module, matcher: _Matcher) -> list[Units]:
        found: list[Units] = []
        for path, module in model.named_modules():
            pattern = matcher.first((path,), list(self.unit_kinds), count=False)
            if pattern is not None:
                units = find_units(self.unit_kinds[pattern], module, path)
                if units:
                    matcher.used.add(pattern)
                    found += units
        return found

    def _unit_parameters(
        self, units: Units, owners: dict[int, list[_Owner]], matcher: _Matcher, taken: dict[int, str]
    ) -> list[PenalisedParameter]:
        chosen = []
        lam = self._lam(tuple(o.name for s in units.slices for o in owners[id(s.module._parameters[s.attr])]), matcher)
        for part in units.slices:
            param = part.module._parameters[part.attr]
            names = tuple(o.name for o in owners[id(param)])
            _check_can_factorise(part.module, param, names[0])
            _take(taken, param, units.name, owners)
            chosen.append(
                PenalisedParameter(
                    names[0], part.module, part.attr, lam, part.dim, part.shape, units.name, names, units.kind
                )
            )
        return chosen

    def _lam(self, aliases: tuple[str, ...], matcher: _Matcher) -> Optional[float]:
        pattern = matcher.first(aliases, list(self.lam_overrides))
        return None if pattern is None else self.lam_overrides[pattern]


def select_parameters(model: nn.Module, **selection: Any) -> list[PenalisedParameter]:
    """``Selection(**selection).choose(model)``: the parameters of ``model`` a callback with these settings penalises.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> [(p.name, p.lam) for p in select_parameters(net, include=["*.bias"], lam_overrides={"2.*": 0.5})]
        [('0.weight', None), ('0.bias', None), ('2.weight', 0.5), ('2.bias', 0.5)]
    """
    return Selection(**selection).choose(model)


class _Matcher:
    """First-match pattern lookups that remember which patterns matched something."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def first(self, names: Sequence[str], patterns: Sequence[str], count: bool = True) -> Optional[str]:
        for pattern in patterns:
            if any(fnmatchcase(name, pattern) for name in names):
                if count:
                    self.used.add(pattern)
                return pattern
        return None

    def check_used(self, selection: Selection, owners: dict[int, list[_Owner]], units: list[Units]) -> None:
        patterns = [*selection.include, *selection.exclude, *selection.lam_overrides]
        patterns += [p for p in selection.groups if p not in selection.unit_kinds]
        unused = [p for p in patterns if p not in self.used]
        if unused:
            names = [o.name for names in owners.values() for o in names]
            listed = ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")
            raise ValueError(
                f"The pattern(s) {unused} match no parameter they could apply to. Patterns are shell-style (`*`"
                " matches dots) and are matched against every name of a parameter (`named_parameters()`, tied names"
                f" too); the model's parameters are: {listed}."
            )
        for pattern, kind in selection.unit_kinds.items():
            if pattern not in self.used:
                raise ValueError(
                    f"`groups[{pattern!r}]` is {kind!r}, which names modules, but no module matching {pattern!r} has"
                    f" {kind}s: an attention (nn.MultiheadAttention, Hugging Face, timm), a feed-forward block or a"
                    " peft LoRA layer, by its module name (for example `groups={'*.attn': 'head'}`)."
                )


def _owners(model: nn.Module) -> dict[int, list[_Owner]]:
    """Every parameter's owners (module, attribute, name), by the parameter's id, in ``named_parameters`` order."""
    owners: dict[int, list[_Owner]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                name = f"{path}.{attr}" if path else attr
                if all(o.name != name for o in owners.get(id(param), [])):
                    owners.setdefault(id(param), []).append(_Owner(name, module, attr))
    return owners


def _take(taken: dict[int, str], param: nn.Parameter, term: str, owners: dict[int, list[_Owner]]) -> None:
    previous = taken.setdefault(id(param), term)
    if previous != term:
        raise ValueError(
            f"`{owners[id(param)][0].name}` would be in two penalty groups, `{previous}` and `{term}`: give each"
            " parameter one group (narrow the `groups` patterns, or `exclude` it from one)."
        )


def _check_can_factorise(module: nn.Module, param: Any, path: str) -> None:
    if not isinstance(param, nn.Parameter) or ".parametrizations." in f".{path}":
        raise ValueError(_parametrised_message(path))
    if isinstance(param, UninitializedParameter):
        raise ValueError(
            f"`{path}` is not initialised yet (a lazy module). Give the module its input size, or run one forward"
            " pass (for example in `setup`) before fitting with SpredCallback."
        )
    if getattr(module, "sparse", False):
        raise ValueError(
            f"`{path}` gets sparse gradients (`{type(module).__name__}(sparse=True)`), which spred cannot turn into"
            f" factor gradients. Use `sparse=False`, or exclude it with `SpredCallback(..., exclude=['{path}'])`."
        )


def _parametrised_message(path: str) -> str:
    return (
        f"`{path}` is already parametrised by something else (torch.nn.utils.parametrize, prune or weight_norm),"
        " so spred cannot factorise it. Remove that parametrisation first (for example"
        " `parametrize.remove_parametrizations` or `prune.remove`), or exclude it with"
        f" `SpredCallback(..., exclude=['{path}'])`."
    )


def _check_patterns(name: str, patterns: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """A tuple of name patterns (one string is one pattern)."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"`{name}` must be a list of name patterns such as ['encoder.*.weight'], got {patterns!r}.")
    return tuple(patterns)


def _check_modules(modules: Any) -> tuple[type[nn.Module], ...]:
    """A tuple of ``nn.Module`` subclasses (one class is accepted as well)."""
    modules = (modules,) if isinstance(modules, type) else tuple(modules)
    if not all(isinstance(m, type) and issubclass(m, nn.Module) for m in modules):
        raise TypeError(f"`modules` must hold nn.Module subclasses such as nn.Linear, got {modules!r}.")
    return modules


def _check_groups(groups: Mapping[str, GroupSpec]) -> dict[str, GroupSpec]:
    """Group specifications by pattern, each valid on its own (whether it fits its parameter is checked at fit)."""
    if not isinstance(groups, Mapping):
        raise TypeError(f"`groups` must map name patterns to a group kind or a dimension, got {groups!r}.")
    for pattern, spec in groups.items():
        check_group_spec(spec, f"`groups[{pattern!r}]`")
    return dict(groups)
