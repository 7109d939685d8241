"""Today's models: what is penalised by default, storage layouts, tied and frozen weights (Hugging Face, peft)."""

import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch import seed_everything
from models import LanguageModel, Regression, tiny_gpt2, token_data, torch_encoder
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers.pytorch_utils import Conv1D

from lightning_spred import SpredCallback, select_parameters


def names(chosen):
    return [p.name for p in chosen]


def test_default_penalises_every_projection_of_gpt2_and_torch_attention():
    gpt = tiny_gpt2()
    conv1d = [f"{n}.weight" for n, m in gpt.named_modules() if isinstance(m, Conv1D)]
    assert len(conv1d) == 8 and names(select_parameters(gpt)) == conv1d  # not the embeddings, not the tied lm_head

    encoder = torch_encoder()
    expected = [
        f"encoder.layers.{i}.{p}"
        for i in range(2)
        for p in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight")
    ]
    assert names(select_parameters(encoder)) == [*expected, "head.weight"]
    separate = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)  # q, k, v of different widths: three bare parameters
    assert names(select_parameters(separate)) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]


class TwoLayers(nn.Module):
    """The same two-layer network stored as ``nn.Linear`` (out, in) or as Hugging Face's ``Conv1D`` (in, out)."""

    def __init__(self, conv1d: bool) -> None:
        super().__init__()
        make = (lambda i, o: Conv1D(o, i)) if conv1d else nn.Linear
        self.fc1, self.fc2 = make(8, 6), make(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def fit_regression(net: nn.Module, groups: dict, steps: int = 300) -> SpredCallback:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    y = torch.stack([x[:, 0] - x[:, 1], x[:, 2], 0.5 * x[:, 0]], dim=1)
    spred = SpredCallback(0.2, groups=groups, threshold=1e-4, verbose=False, print_report=False)
    data = DataLoader(TensorDataset(x, y), batch_size=64)
    quiet_trainer(max_steps=steps, callbacks=[spred]).fit(Regression(net, lr=0.1), data)
    return spred


@pytest.mark.parametrize("kinds", [("input", "input"), ("output", "input"), ("channel", "input")])
def test_group_kinds_mean_the_same_units_on_conv1d_as_on_linear(kinds):
    torch.manual_seed(0)
    linear, conv = TwoLayers(conv1d=False), TwoLayers(conv1d=True)
    with torch.no_grad():
        for a, b in ((linear.fc1, conv.fc1), (linear.fc2, conv.fc2)):
            b.weight.copy_(a.weight.T)
            b.bias.copy_(a.bias)
    groups = {"net.fc1.weight": kinds[0], "net.fc2.weight": kinds[1]}
    fit_regression(linear, groups)
    fit_regression(conv, groups)
    for a, b, kind in ((linear.fc1, conv.fc1, kinds[0]), (linear.fc2, conv.fc2, kinds[1])):
        torch.testing.assert_close(b.weight.T, a.weight, atol=1e-5, rtol=0)
        units = a.weight.abs().sum(dim=0 if kind == "input" else 1) == 0
        assert torch.equal(units, b.weight.abs().sum(dim=1 if kind == "input" else 0) == 0)
        if kind == "channel":
            assert (a.bias[units] == 0).all() and (b.bias[units] == 0).all()
    first = linear.fc1.weight.abs().sum(dim=0 if kinds[0] == "input" else 1) == 0
    assert 0 < int(first.sum()) < len(first)  # whole units left, the same ones in both layouts


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.Embedding(10, 4), r"the layout of an Embedding's `weight` is not known.*groups=\{'net.layer.weight': 1\}"),
        (nn.Conv2d(4, 4, 3, groups=2), "a grouped conv has no dimension of whole input channels"),
    ],
)
def test_a_kind_whose_units_are_unknown_is_refused_before_training(layer, match):
    net = nn.Module()
    net.layer = layer
    before = layer.weight.detach().clone()
    spred = SpredCallback(0.1, groups={"net.layer.weight": "input"}, verbose=False)
    with pytest.raises(ValueError, match=match):
        quiet_trainer(max_steps=1, callbacks=[spred]).fit(Regression(net), DataLoader(TensorDataset(torch.zeros(1))))
    assert torch.equal(layer.weight, before)


def test_a_tied_weight_is_one_term_under_every_name():
    gpt = tiny_gpt2()
    chosen = select_parameters(gpt, include=["lm_head.weight"])  # a pattern may name any alias
    tied = [p for p in chosen if "lm_head.weight" in p.aliases]
    assert [p.aliases for p in tied] == [("transformer.wte.weight", "lm_head.weight")]
    assert "transformer.wte.weight" in names(select_parameters(gpt, modules=[nn.Linear]))  # any owner's type counts
    with pytest.raises(ValueError, match="match no parameter.*transformer.wte.weight.*lm_head.weight"):
        select_parameters(gpt, include=["lm_haed.weight"])


def test_a_tied_weight_trains_once_and_checkpoints_sparse_under_both_names(tmp_path):
    seed_everything(0)
    gpt = tiny_gpt2()
    spred = SpredCallback(
        0.02, include=["model.lm_head.weight"], modules=(), threshold=1e-3, verbose=False, print_report=False
    )
    trainer = quiet_trainer(max_steps=60, callbacks=[spred])
    trainer.fit(LanguageModel(gpt), token_data())
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    zeros = int((gpt.lm_head.weight == 0).sum())
    assert 0 < zeros < gpt.lm_head.weight.numel()
    assert [layer.name for layer in spred.report().layers] == ["model.transformer.wte.weight"]
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(state["model.lm_head.weight"], state["model.transformer.wte.weight"], atol=0, rtol=0)
    assert int((state["model.lm_head.weight"] == 0).sum()) == zeros


def test_frozen_base_weights_of_a_lora_model_are_neither_penalised_nor_counted():
    from peft import LoraConfig, get_peft_model

    seed_everything(0)
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    spred = SpredCallback(target_sparsity=0.5, verbose=False, print_report=False)
    quiet_trainer(max_steps=30, callbacks=[spred]).fit(LanguageModel(model), token_data())
    report = spred.report()
    assert report.layers and all(".lora_" in layer.name for layer in report.layers)
    adapters = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert report.total.parameters == sum(p.numel() for p in adapters)
    assert report.total.sparsity == pytest.approx(0.5, abs=1e-3)
    for name, before in frozen.items():
        assert torch.equal(model.get_parameter(name), before), name
