"""Before a refit, the layers a normalisation absorbs get their scale back: the same function, a sane step size."""

import copy

import pytest
import torch
from helpers import DigitsConvBN, DigitsMLP, digits_data, quiet_trainer
from lightning.pytorch import Callback, seed_everything
from torch import nn

from lightning_spred import SpredCallback
from lightning_spred.factorization import Factorization, Member
from lightning_spred.scales import find_absorbed, restore_norms
from lightning_spred.trace import ForwardTrace


class Body(nn.Module):
    """conv -> BN (absorbed), conv -> BN plus a skip around the BN (not absorbed), a head (not absorbed)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, eps=1e-12)  # eps: see below
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.skip = nn.Identity()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(h)
        h = torch.relu(self.bn2(z)) + self.skip(z)
        return self.head(h.mean(dim=(2, 3)))


def terms_of(net: nn.Module, started: bool = False) -> list[Factorization]:
    layers = {"conv1": net.conv1, "conv2": net.conv2, "head": net.head}
    terms = [Factorization([Member(m, "weight", f"{n}.weight", None)], 0.1, 0.0) for n, m in layers.items()]
    for f in terms if started else ():
        f.start()  # records each weight's norm, as the first optimizer step does
    return terms


def test_only_layers_whose_every_output_is_normalised_are_found():
    net = Body()
    trace = ForwardTrace(net)
    net(torch.randn(2, 1, 6, 6))
    found = find_absorbed(trace, terms_of(net))
    trace.stop()
    assert [(layer.module, layer.norms) for layer in found] == [(net.conv1, (net.bn1,))]


def test_restoring_the_norm_keeps_the_function_in_training_and_in_evaluation():
    torch.manual_seed(0)
    net = Body()
    terms = terms_of(net, started=True)
    start = net.conv1.weight.norm().item()
    x = torch.randn(16, 1, 6, 6)
    with torch.no_grad():
        net.conv1.weight.mul_(0.02)  # as the penalty shrinks a layer BatchNorm follows
        net.conv1.weight[0, 0, 0, 0] = 0.0
        net.conv1.bias.mul_(0.02)
    trace = ForwardTrace(net)
    for _ in range(20):  # running statistics of the shrunk layer
        net(x)
    trace.stop()
    net.eval()
    eval_before = net(x)
    train_before = copy.deepcopy(net).train()(x)  # a twin: a pass in training mode moves the running statistics
    net.train()
    factors = restore_norms(find_absorbed(trace, terms))
    torch.testing.assert_close(factors, torch.tensor([50.0]), rtol=1e-5, atol=0)
    assert net.conv1.weight.norm().item() == pytest.approx(start, rel=1e-5)
    assert net.conv1.weight[0, 0, 0, 0] == 0  # zeros stay zeros
    # the BatchNorm sees its inputs scaled by 50: the same outputs up to its eps (made negligible here)
    net.eval()
    torch.testing.assert_close(net(x), eval_before, rtol=1e-4, atol=1e-5)
    net.train()
    torch.testing.assert_close(net(x), train_before, rtol=1e-4, atol=1e-5)


class ConvNorms(Callback):
    """The norm of the first conv's weight before every batch."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.norms[trainer.global_step] = pl_module.net.body[0].weight.norm().item()


@pytest.mark.parametrize("restore", [True, False])
def test_a_refit_gives_the_layers_batchnorm_follows_the_scale_the_penalty_took(restore):
    seed_everything(0)
    data, _ = digits_data(0)
    model = DigitsMLP(steps=12 * len(data))
    model.net = DigitsConvBN()
    start = model.net.body[0].weight.norm().item()
    spy = ConvNorms()
    spred = SpredCallback(0.02, refit_fraction=0.3, restore_scales=restore, verbose=False, print_report=False)
    quiet_trainer(max_epochs=12, callbacks=[spred, spy]).fit(model, data)
    refit = spred.steering.refit_step
    assert spy.norms[refit - 1] < 0.5 * start  # the penalty shrank the layer its BatchNorm follows
    if restore:
        assert spy.norms[refit] == pytest.approx(start, rel=1e-4)
    else:
        assert spy.norms[refit] < 0.5 * start


def test_a_layer_that_grew_is_left_as_it_is():
    torch.manual_seed(0)
    net = Body()
    terms = terms_of(net, started=True)
    with torch.no_grad():
        net.conv1.weight.mul_(1.7)  # plain SGD grows scale-free weights
    grown = net.conv1.weight.clone()
    trace = ForwardTrace(net)
    net(torch.randn(2, 1, 6, 6))
    trace.stop()
    assert restore_norms(find_absorbed(trace, terms)).tolist() == [1.0]
    assert torch.equal(net.conv1.weight, grown)


def test_restore_scales_must_be_a_bool():
    with pytest.raises(TypeError, match="`restore_scales` must be True or False"):
        SpredCallback(1e-3, restore_scales="yes")
