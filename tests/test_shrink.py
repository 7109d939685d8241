"""`shrink` never hands back a model that computes something else: removals proved from the weights, checked on other
inputs than the example, attention heads and feed-forward neurons of today's models removed for real."""

import pytest
import torch
from models import VOCAB, tiny_gpt2, tiny_llama, torch_encoder
from resnet import ResNet18
from torch import nn
from vit import VisionTransformer

from lightning_spred import remove_channels, shrink


class StemAndResidual(nn.Module):
    """A stem conv + BN + ReLU, then one residual block ``relu(x + BN(conv(x)))``, pooled into a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(x + self.bn(self.conv(x))))


def residual_reproduction() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Channel 0 of the stem is a zero channel group, but the block's branch writes channel 0 too: it is inactive on
    the example (a BN shift of -0.5, a small filter) and active on larger inputs."""
    torch.manual_seed(0)
    net = StemAndResidual().eval()
    with torch.no_grad():
        net.stem[0].weight.abs_()  # positive images give positive features
        net.stem[0].weight[0] = 0.0
        net.stem[0].bias[0] = 0.0
        net.stem[1].weight[0] = net.stem[1].bias[0] = 0.0
        net.conv.weight[0] = 0.005
        net.bn.bias[0] = -0.5
    example = torch.rand(8, 3, 6, 6)
    other = 100 * torch.rand(8, 3, 6, 6)
    with torch.no_grad():
        assert (net.bn(net.conv(net.stem(example)))[:, 0] < 0).all()  # channel 0 is inactive on the example
        assert (net.bn(net.conv(net.stem(other)))[:, 0] > 0).any()  # and active elsewhere
    return net, example, other


def test_a_channel_that_a_varying_residual_branch_also_writes_is_kept():
    net, example, other = residual_reproduction()
    result = shrink(net, example)
    assert "stem.0" not in result.removed
    assert "residual branch that still varies" in result.skipped["stem.0"]
    torch.testing.assert_close(result.model(other), net(other), atol=1e-5, rtol=1e-5)


def test_a_removal_that_changes_the_outputs_is_an_error_naming_it(monkeypatch):
    # with the proof switched off, the constant seen on the example is wrong elsewhere: the other inputs show it
    net, example, other = residual_reproduction()
    monkeypatch.setattr(remove_channels, "_proved_constant", lambda graph, group, units: (units, None))
    with pytest.raises(RuntimeError, match=r"removing 1 output units of `stem.0` changed the outputs by up to"):
        shrink(net, example, check_inputs=[other])
    assert net.stem[0].weight.shape[0] == 4  # the model passed in is unchanged


def zero_half_of_the_inner_channels(net: ResNet18) -> int:
    """Channel groups (filter, BN scale and shift) zero in half the inner channels of every block, as spred leaves
    them; returns how many."""
    removed = 0
    with torch.no_grad():
        for name, module in net.named_modules():
            if name.endswith(".conv1"):
                block = net.get_submodule(name.rpartition(".")[0])
                half = module.weight.shape[0] // 2
                module.weight[:half] = 0.0
                block.bn1.weight[:half] = block.bn1.bias[:half] = 0.0
                removed += half
    return removed


@pytest.mark.parametrize("timm", [False, True], ids=["torchvision", "timm"])
def test_full_width_resnet18_shrinks_exactly_in_both_layouts(timm):
    torch.manual_seed(0)
    net = ResNet18(num_classes=10, timm=timm).eval()
    for module in net.modules():  # running statistics as after training, not the defaults
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    zeroed = zero_half_of_the_inner_channels(net)
    result = shrink(net, torch.randn(2, 3, 64, 64))
    assert sum(result.removed.values()) == zeroed
    assert result.macs[1] < 0.65 * result.macs[0]
    fresh = torch.randn(2, 3, 64, 64)  # an input shrink never saw
    with torch.no_grad():
        expected, got = net(fresh), result.model(fresh)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def vit_with_zero_units() -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer().eval()
    attn, mlp = vit.blocks[0].attn, vit.blocks[1].mlp
    size, dim = attn.head_dim, 64
    with torch.no_grad():
        attn.qkv.weight[2 * dim + 5] = 0.0  # one row of v: unstructured sparsity, not a head
        for third in range(3):  # head 1: its rows of q, k and v, and its columns of the projection
            rows = slice(third * dim + size, third * dim + 2 * size)
            attn.qkv.weight[rows] = 0.0
            attn.qkv.bias[rows] = 0.0
        attn.proj.weight[:, size : 2 * size] = 0.0
        mlp.fc1.weight[:10] = 0.0  # ten neurons: rows and biases of fc1 (GELU(0) = 0)
        mlp.fc1.bias[:10] = 0.0
    return vit


def test_vit_zero_heads_and_neurons_are_removed_and_a_zero_row_of_v_never_crashes():
    vit = vit_with_zero_units()
    result = shrink(vit, torch.randn(4, 1, 28, 28))
    assert result.removed == {"blocks.0.attn": 1, "blocks.1.mlp": 10}
    attn = result.model.blocks[0].attn
    assert (attn.num_heads, attn.attn_dim, attn.qkv.out_features, attn.proj.in_features) == (3, 48, 144, 48)
    assert result.model.blocks[1].mlp.fc1.out_features == 118
    fresh = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(result.model(fresh), vit(fresh), atol=1e-5, rtol=1e-5)


def test_gpt2_heads_neurons_and_a_head_that_outputs_its_value_bias():
    torch.manual_seed(0)
    gpt = tiny_gpt2().eval()
    attn, mlp = gpt.transformer.h[0].attn, gpt.transformer.h[1].mlp
    size, width = attn.head_dim, 32
    with torch.no_grad():
        attn.c_attn.weight[:, 2 * width : 2 * width + size] = 0.0  # head 0: value columns zero, its value bias not
        attn.c_attn.bias[2 * width : 2 * width + size] = torch.randn(size)
        attn.c_proj.weight[3 * size : 4 * size] = 0.0  # head 3: its rows of the output projection (Conv1D: (in, out))
        mlp.c_fc.weight[:, :7] = 0.0
        mlp.c_fc.bias[:7] = 0.0
    tokens = torch.randint(0, VOCAB, (4, 12))
    result = shrink(gpt, tokens)
    assert result.removed == {"transformer.h.0.attn": 2, "transformer.h.1.mlp": 7}
    small = result.model.transformer.h[0].attn
    assert (small.num_heads, small.split_size, small.c_attn.weight.shape, small.c_proj.weight.shape) == (
        2, 16, (32, 48), (16, 32)
    )  # fmt: skip
    fresh = torch.randint(0, VOCAB, (4, 12))
    torch.testing.assert_close(result.model(fresh).logits, gpt(fresh).logits, atol=1e-5, rtol=1e-5)


def test_llama_key_value_groups_and_swiglu_neurons():
    torch.manual_seed(0)
    llama = tiny_llama().eval()
    attn, mlp = llama.model.layers[0].self_attn, llama.model.layers[1].mlp
    with torch.no_grad():
        attn.v_proj.weight[8:16] = 0.0  # key-value head 1 (of 2): the two query heads that read it output zero
        mlp.up_proj.weight[:5] = 0.0  # silu(gate) * 0 = 0
        mlp.gate_proj.weight[5:9] = 0.0  # silu(0) * up = 0
    tokens = torch.randint(0, VOCAB, (4, 12))
    result = shrink(llama, tokens)
    assert result.removed == {"model.layers.0.self_attn": 1, "model.layers.1.mlp": 9}
    small = result.model.model.layers[0].self_attn
    assert (small.q_proj.out_features, small.k_proj.out_features, small.o_proj.in_features) == (16, 8, 16)
    fresh = torch.randint(0, VOCAB, (4, 12))
    torch.testing.assert_close(result.model(fresh).logits, llama(fresh).logits, atol=1e-5, rtol=1e-5)


def test_multihead_attention_keeps_its_zero_heads_and_says_why():
    torch.manual_seed(0)
    encoder = torch_encoder().eval()
    attention = encoder["encoder"].layers[0].self_attn
    with torch.no_grad():
        attention.out_proj.weight[:, :8] = 0.0  # head 0's columns of the output projection
    tokens = torch.randint(0, VOCAB, (4, 12))

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = encoder

        def forward(self, x):
            return self.model["head"](self.model["encoder"](self.model["embed"](x)))

    result = shrink(Wrapped(), tokens)
    assert "model.encoder.layers.0.self_attn" not in result.removed
    assert "as wide as its input" in result.skipped["model.encoder.layers.0.self_attn"]
