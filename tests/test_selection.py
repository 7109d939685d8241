"""Which parameters are penalised, and the clear errors for what cannot be."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from lightning_spred import select_parameters


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 3)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)


def paths(targets):
    return [t.path for t in targets]


def test_default_is_linear_and_conv_weights_only():
    assert paths(select_parameters(Net(), lam=0.1)) == ["conv.weight", "head.weight"]


def test_choose_by_type_pattern_and_function():
    net = Net()
    assert paths(select_parameters(net, 0.1, modules=[nn.Embedding])) == ["embed.weight"]
    assert paths(select_parameters(net, 0.1, include=["*.bias"], exclude=["conv.*"])) == [
        "norm.bias",
        "head.weight",
        "head.bias",
    ]
    chosen = select_parameters(net, 0.1, select=lambda name, module, p: p.ndim == 1 and "norm" in name)
    assert paths(chosen) == ["norm.weight", "norm.bias"]


def test_lam_overrides_first_match_wins():
    targets = select_parameters(Net(), 0.1, lam_overrides={"head.*": 0.5, "*": 0.2})
    assert [(t.path, t.lam) for t in targets] == [("conv.weight", 0.2), ("head.weight", 0.5)]


def test_frozen_parameters_are_left_alone():
    net = Net()
    net.conv.weight.requires_grad_(False)
    assert paths(select_parameters(net, 0.1)) == ["head.weight"]


def test_tied_weight_is_chosen_once():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    net[1].weight = net[0].weight
    assert paths(select_parameters(net, 0.1)) == ["0.weight"]


def test_groups_resolve_named_dims():
    targets = select_parameters(Net(), 0.1, groups={"head.weight": "input", "conv.weight": "output"})
    assert [(t.path, t.dim) for t in targets] == [("conv.weight", 0), ("head.weight", 1)]


@pytest.mark.parametrize("spec", [3, "columns", 1.5])
def test_bad_group_dim_is_explained(spec):
    with pytest.raises(ValueError, match="does not fit `head.weight`"):
        select_parameters(Net(), 0.1, groups={"head.weight": spec})


def test_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"match no penalised parameter.*conv.weight, head.weight"):
        select_parameters(Net(), 0.1, lam_overrides={"haed.*": 0.5})


class Positive(nn.Module):
    def forward(self, x):
        return x.abs()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda m: parametrize.register_parametrization(m, "weight", Positive()),
        lambda m: prune.l1_unstructured(m, "weight", amount=0.5),
        lambda m: torch.nn.utils.weight_norm(m),
    ],
    ids=["parametrize", "prune", "weight_norm"],
)
def test_already_parametrised_weight_is_refused(wrap):
    net = Net()
    wrap(net.head)
    with pytest.raises(ValueError, match="`head.weight` is already parametrised.*exclude=\\['head.weight'\\]"):
        select_parameters(net, 0.1)
    assert paths(select_parameters(net, 0.1, exclude=["head.weight"])) == ["conv.weight"]


def test_lazy_module_is_refused_with_the_fix():
    net = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match="not initialised yet"):
        select_parameters(net, 0.1)
