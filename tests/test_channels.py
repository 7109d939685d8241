"""Channel groups (a filter with its bias and BatchNorm) and shrinking networks with BatchNorm and residual adds."""

import warnings

import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch import LightningModule
from resnet import ResNet18
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spred import SpredCallback, shrink
from lightning_spred.channels import norm_registered_after


def images(n=64, size=8, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=generator)
    y = x[:, 0, :classes, 0].argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=16)


class Classifier(LightningModule):
    def __init__(self, net, head="net.8.weight", lr=0.1):
        super().__init__()
        self.net, self.head, self.lr = net, head, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        # weight decay on the unpenalised classifier, so that the last channels cannot hand it their scale
        named = list(self.named_parameters())
        groups = [
            {"params": [p for n, p in named if n != self.head]},
            {"params": [p for n, p in named if n == self.head], "weight_decay": 1e-3},
        ]
        return torch.optim.SGD(groups, lr=self.lr, momentum=0.9)


def conv_bn_net():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    )  # fmt: skip


def test_a_channel_group_holds_the_filter_its_bias_and_its_batchnorm():
    net = conv_bn_net()
    assert norm_registered_after(net, "0") == ("1", net[1])
    assert norm_registered_after(net, "8") is None
    spred = SpredCallback(0.1, groups={"net.0.weight": "channel", "net.3.weight": "channel"}, verbose=False)
    quiet_trainer(max_steps=1, callbacks=[spred]).fit(Classifier(net), images())
    assert [[m.name for m in f.members] for f in spred.factorizations] == [
        ["net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias"],
        ["net.3.weight", "net.3.bias", "net.4.weight", "net.4.bias"],
    ]


def test_channel_groups_zero_whole_channels_and_shrink_removes_them_exactly():
    torch.manual_seed(0)
    net = conv_bn_net()
    spred = SpredCallback(0.03, threshold=1e-3, groups={"net.0.weight": "channel", "net.3.weight": "channel"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_epochs=40, callbacks=[spred]).fit(Classifier(net), images())
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "undoes its scale" in m]  # the BatchNorm is in the group
    # ... but the next BatchNorm undoes the common scale of the first layer's channels: said once, for that layer
    (collapse,) = [m for m in messages if "undoes their common scale" in m]
    assert collapse.startswith("The channels of `net.0.weight` feed a Conv2d whose BatchNorm2d undoes")
    dead = {}
    for conv, norm in ((0, 1), (3, 4)):
        columns = [net[conv].weight.flatten(1), net[conv].bias, net[norm].weight, net[norm].bias]
        entries = torch.cat([c.reshape(16, -1) for c in columns], dim=1)
        zero = (entries == 0).all(dim=1)
        assert zero.any() and ((entries != 0).all(dim=1) | zero).all()  # whole channels are exactly zero
        dead[str(conv)] = int(zero.sum())
    example = next(iter(images()))[0]
    result = shrink(net, example)
    assert result.removed == dead
    assert result.model[0].out_channels == 16 - dead["0"]
    fresh = torch.randn_like(example)
    torch.testing.assert_close(result.model.eval()(fresh), net.eval()(fresh), rtol=1e-4, atol=1e-5)
    assert result.macs[1] < result.macs[0] and result.parameters[1] < result.parameters[0]


def test_shrink_keeps_the_model_s_outputs_and_the_input_s_mode():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        net[0].weight[:4] = 0  # hidden units that output their bias: folded into the next layer
        net[2].weight[1:3] = 0  # class scores that are constants: the model's outputs stay
    net.train()
    result = shrink(net, torch.randn(32, 8))
    assert result.removed == {"0": 4}
    assert result.skipped == {"2": "its outputs are the model's outputs"}
    assert result.model.training and result.model[2].out_features == 5
    x = torch.randn(10, 8)
    torch.testing.assert_close(result.model(x), net(x), rtol=1e-4, atol=1e-6)


class Stem(nn.Module):
    """conv -> BN -> ReLU -> 1x1 conv without bias -> BN (the ResNet layout of a consumer), and a padded conv."""

    def __init__(self, padded_consumer: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(6, 4, 3, padding=1) if padded_consumer else None

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(h))
        return out + self.conv3(h) if self.conv3 is not None else out


@pytest.mark.parametrize("padded_consumer", [True, False])
def test_shrink_folds_constants_into_the_next_batchnorm_and_removes_unit_by_unit(padded_consumer):
    torch.manual_seed(0)
    net = Stem(padded_consumer)
    net(torch.randn(8, 1, 6, 6))  # running statistics that are not the defaults
    with torch.no_grad():
        net.bn1.weight[[1, 2]] = 0  # channels that output their shift: constant
        net.bn1.bias[1] = 0.0  # ... zero after the ReLU: removable everywhere
        net.bn1.bias[2] = 0.7  # ... 0.7: into bn2's running mean, but the padded conv3 cannot take it exactly
    net.eval()
    result = shrink(net, torch.randn(8, 1, 6, 6))
    if padded_consumer:
        assert result.removed == {"conv1": 1} and "padded" in result.skipped["conv1"]
    else:
        assert result.removed == {"conv1": 2}
    x = torch.randn(4, 1, 6, 6)
    torch.testing.assert_close(result.model(x), net(x), rtol=1e-4, atol=1e-6)


class ResNet(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = ResNet18(num_classes=4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        named = list(self.named_parameters())
        return torch.optim.SGD(
            [
                {"params": [p for n, p in named if not n.startswith("net.fc")]},
                {"params": [p for n, p in named if n.startswith("net.fc")], "weight_decay": 1e-3},
            ],
            lr=0.05,
            momentum=0.9,
        )


def test_resnet18_channel_groups_give_whole_zero_channels():
    torch.manual_seed(0)
    model = ResNet()
    x = torch.randn(16, 3, 16, 16)
    data = DataLoader(TensorDataset(x, torch.randint(0, 4, (16,))), batch_size=8)
    groups = {"net.*conv*.weight": "channel", "net.*downsample.0.weight": "channel"}
    # zeros frozen after 70% of the steps: whatever is zero then stays exactly zero
    spred = SpredCallback(1.0, threshold=1e-2, refit_fraction=0.3, groups=groups, verbose=False)
    quiet_trainer(max_steps=50, callbacks=[spred]).fit(model, data)
    members = {f.name: [m.name for m in f.members] for f in spred.factorizations}
    assert len(members) == 20  # every conv of ResNet-18, each with its BatchNorm
    block = "net.layer1.0"
    assert members[f"{block}.conv1.weight"] == [f"{block}.conv1.weight", f"{block}.bn1.weight", f"{block}.bn1.bias"]
    assert members["net.layer2.0.downsample.0.weight"][1:] == [
        "net.layer2.0.downsample.1.weight", "net.layer2.0.downsample.1.bias"
    ]  # fmt: skip
    zero_channels = 0
    for f in spred.factorizations:
        rows = torch.cat([w.detach().reshape(w.shape[0], -1) for w in f.weights], dim=1)
        zero = (rows == 0).all(dim=1)
        assert ((rows != 0).any(dim=1) | zero).all()  # a channel is zero in every tensor of its group, or in none
        zero_channels += int(zero.sum())
    assert zero_channels > 0


@torch.no_grad()
def zero_channels(net, producers, channels):
    for conv, norm in producers:
        for tensor in (net.get_submodule(conv).weight, net.get_submodule(norm).weight, net.get_submodule(norm).bias):
            tensor[channels] = 0


def test_shrink_removes_inner_and_residual_stage_channels_of_resnet18():
    torch.manual_seed(0)
    net = ResNet18(num_classes=4)
    x = torch.randn(8, 3, 32, 32)
    net.train()(x)  # running statistics that are not the defaults
    net.eval()
    zero_channels(net, [("layer1.0.conv1", "layer1.0.bn1")], list(range(10)))  # inside a block
    # a channel of the first stage is made by the stem and by the last BatchNorm of each block before the addition
    stage = [("conv1", "bn1"), ("layer1.0.conv2", "layer1.0.bn2"), ("layer1.1.conv2", "layer1.1.bn2")]
    zero_channels(net, stage, [3, 5])
    zero_channels(net, [("layer1.1.conv2", "layer1.1.bn2")], [7])  # one producer only: the channel still varies
    result = shrink(net, x)
    assert result.removed["layer1.0.conv1"] == 10
    assert result.model.layer1[0].conv1.out_channels == 54
    assert result.model.conv1.out_channels == 62 and result.model.layer1[1].conv2.out_channels == 62
    assert result.macs[1] < result.macs[0] and result.parameters[1] < result.parameters[0]
    fresh = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(result.model(fresh), net(fresh), rtol=1e-4, atol=1e-5)
