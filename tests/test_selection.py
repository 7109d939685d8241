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


def paths(chosen):
    return [p.name for p in chosen]


def test_default_is_linear_and_conv_weights_only():
    assert paths(select_parameters(Net())) == ["conv.weight", "head.weight"]


def test_choose_by_type_pattern_and_function():
    net = Net()
    assert paths(select_parameters(net, modules=[nn.Embedding])) == ["embed.weight"]
    assert paths(select_parameters(net, include=["*.bias"], exclude=["conv.*"])) == [
        "norm.bias",
        "head.weight",
        "head.bias",
    ]
    chosen = select_parameters(net, select=lambda name, module, p: p.ndim == 1 and "norm" in name)
    assert paths(chosen) == ["norm.weight", "norm.bias"]


def test_lam_overrides_first_match_wins():
    chosen = select_parameters(Net(), lam_overrides={"head.*": 0.5, "*": 0.2})
    assert [(p.name, p.lam) for p in chosen] == [("conv.weight", 0.2), ("head.weight", 0.5)]


def test_frozen_parameters_are_chosen_too():
    # a frozen weight is penalised only while it trains (a fine-tuning callback may unfreeze it)
    net = Net()
    net.conv.weight.requires_grad_(False)
    assert paths(select_parameters(net)) == ["conv.weight", "head.weight"]


def test_tied_weight_is_chosen_once():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    net[1].weight = net[0].weight
    assert paths(select_parameters(net)) == ["0.weight"]


def test_groups_resolve_named_dims_and_choose_what_they_name():
    chosen = select_parameters(Net(), groups={"head.weight": "input", "conv.weight": "output"})
    assert [(p.name, p.dim) for p in chosen] == [("conv.weight", 0), ("head.weight", 1)]
    only_named = select_parameters(Net(), modules=(), groups={"head.weight": "input"})
    assert paths(only_named) == ["head.weight"]


@pytest.mark.parametrize(
    ("spec", "where"),
    [(3, "does not fit `head.weight`"), ("columns", r"`groups\['head.weight'\]` is 'columns'"), (1.5, "is 1.5")],
)
def test_bad_group_dim_is_explained(spec, where):
    with pytest.raises(ValueError, match=f"{where}.*'channel'") as error:
        select_parameters(Net(), groups={"head.weight": spec})
    assert "'input'" in str(error.value) and "'output'" in str(error.value)


@pytest.mark.parametrize("argument", ["lam_overrides", "include", "exclude", "groups"])
def test_pattern_that_matches_nothing_is_an_error_listing_the_names(argument):
    value = ["haed.*"] if argument in ("include", "exclude") else {"haed.*": 0.5 if argument == "lam_overrides" else 1}
    with pytest.raises(ValueError, match=r"\['haed\.\*'\] match no parameter.*embed.weight, conv.weight, conv.bias"):
        select_parameters(Net(), **{argument: value})


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
        select_parameters(net)
    assert paths(select_parameters(net, exclude=["head.weight"])) == ["conv.weight"]


def test_lazy_module_is_refused_with_the_fix():
    net = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match="not initialised yet"):
        select_parameters(net)


def test_sparse_embedding_is_refused_with_the_fix():
    net = nn.Sequential(nn.Embedding(10, 4, sparse=True))
    with pytest.raises(ValueError, match=r"sparse gradients.*sparse=False.*exclude=\['0.weight'\]"):
        select_parameters(net, include=["0.weight"])
