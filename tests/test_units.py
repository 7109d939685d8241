"""Groups that span several tensors (attention heads, feed-forward neurons, LoRA ranks): the entries of each group
against explicit slicing, training against the explicit factorised objective, targets that count them, shrink and
Hugging Face round trips after fit."""

import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch import seed_everything
from models import VOCAB, LanguageModel, tiny_gpt2, tiny_llama, token_data, torch_encoder
from vit import VisionTransformer

from lightning_spred import Selection, SpredCallback, shrink
from lightning_spred.terms import PenaltyTerms


def rows(start, size):
    return list(range(start, start + size))


def explicit_norms(parts, units):
    """Each unit's norm from ``parts``: (tensor, dimension, indices of each unit along it), summed across parts."""
    squares = torch.zeros(units)
    for tensor, dim, indices in parts:
        for unit in range(units):
            squares[unit] += tensor.detach().index_select(dim, torch.tensor(indices(unit))).pow(2).sum()
    return squares.sqrt()


def stacked_heads(width, heads):
    """The rows (or columns) of head ``h`` in q, k and v stacked: ``t * width + h * d + i``."""
    d = width // heads
    return lambda h: [t * width + i for t in range(3) for i in rows(h * d, d)]


def head_block(width, heads):
    d = width // heads
    return lambda h: rows(h * d, d)


def neuron(j):
    return [j]


def gpt2_parts(m):
    attn, mlp = m.transformer.h[0].attn, m.transformer.h[1].mlp
    stacked, block = stacked_heads(32, 4), head_block(32, 4)
    heads = [(attn.c_attn.weight, 1, stacked), (attn.c_attn.bias, 0, stacked), (attn.c_proj.weight, 0, block)]
    neurons = [(mlp.c_fc.weight, 1, neuron), (mlp.c_fc.bias, 0, neuron), (mlp.c_proj.weight, 0, neuron)]
    return [("transformer.h.0.attn", 4, heads), ("transformer.h.1.mlp", 128, neurons)]


def llama_parts(m):
    attn, mlp = m.model.layers[0].self_attn, m.model.layers[1].mlp
    query, key = head_block(32, 2), head_block(16, 2)  # query heads 2j and 2j+1 read key-value head j
    heads = [(attn.q_proj.weight, 0, query), (attn.k_proj.weight, 0, key), (attn.v_proj.weight, 0, key)]
    heads.append((attn.o_proj.weight, 1, query))
    neurons = [(mlp.gate_proj.weight, 0, neuron), (mlp.up_proj.weight, 0, neuron), (mlp.down_proj.weight, 1, neuron)]
    return [("model.layers.0.self_attn", 2, heads), ("model.layers.1.mlp", 64, neurons)]


def torch_parts(m):
    attn, layer = m["encoder"].layers[0].self_attn, m["encoder"].layers[1]
    stacked, block = stacked_heads(32, 4), head_block(32, 4)
    heads = [(attn.in_proj_weight, 0, stacked), (attn.in_proj_bias, 0, stacked), (attn.out_proj.weight, 1, block)]
    neurons = [(layer.linear1.weight, 0, neuron), (layer.linear1.bias, 0, neuron), (layer.linear2.weight, 1, neuron)]
    return [("encoder.layers.0.self_attn", 4, heads), ("encoder.layers.1", 64, neurons)]


def timm_parts(m):
    attn, mlp = m.blocks[0].attn, m.blocks[1].mlp
    stacked, block = stacked_heads(64, 4), head_block(64, 4)
    heads = [(attn.qkv.weight, 0, stacked), (attn.qkv.bias, 0, stacked), (attn.proj.weight, 1, block)]
    neurons = [(mlp.fc1.weight, 0, neuron), (mlp.fc1.bias, 0, neuron), (mlp.fc2.weight, 1, neuron)]
    return [("blocks.0.attn", 4, heads), ("blocks.1.mlp", 128, neurons)]


CASES = {
    "gpt2": (tiny_gpt2, {"transformer.h.0.attn": "head", "transformer.h.1.mlp": "neuron"}, gpt2_parts),
    "llama": (tiny_llama, {"model.layers.0.self_attn": "head", "model.layers.1.mlp": "neuron"}, llama_parts),
    "torch": (torch_encoder, {"encoder.layers.0.self_attn": "head", "encoder.layers.1": "neuron"}, torch_parts),
    "timm": (VisionTransformer, {"blocks.0.attn": "head", "blocks.1.mlp": "neuron"}, timm_parts),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_group_is_the_whole_unit(case):
    make, groups, explicit = CASES[case]
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))  # every entry distinct and nonzero
    terms = {f.name: f for f in PenaltyTerms.build(Selection(groups=groups).choose(model), threshold=0.0)}
    for name, count, parts in explicit(model):
        assert terms[name].size == count
        torch.testing.assert_close(terms[name].norms(), explicit_norms(parts, count), rtol=1e-5, atol=1e-5)


def test_lora_ranks_are_rows_of_a_with_columns_of_b():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # lora_B starts at zero: make the check non-trivial
    chosen = Selection(groups={"*.h.0.attn.c_attn": "rank"}).choose(model)
    (term,) = PenaltyTerms.build(chosen, threshold=0.0)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = (a.pow(2).sum(dim=1) + b.pow(2).sum(dim=0)).sqrt()
    assert term.name == "base_model.model.transformer.h.0.attn.c_attn[default]"
    torch.testing.assert_close(term.norms(), expected.detach())


def test_training_head_groups_is_the_explicit_factorised_objective():
    """Three SGD steps of the callback on Llama's key-value groups against autograd on ``u_i * v[unit of each entry]``,
    with the units of each entry given by explicit index arithmetic, not by the package's views."""
    seed_everything(0)
    module = LanguageModel(tiny_llama(), lr=0.05, optimizer="sgd")
    reference = LanguageModel(tiny_llama(), lr=0.05, optimizer="sgd")
    reference.load_state_dict(module.state_dict())
    lam, name = 0.01, "model.model.layers.0.self_attn"
    attn = reference.model.model.layers[0].self_attn
    index = {
        "q_proj": (0, torch.arange(32) // 16),
        "k_proj": (0, torch.arange(16) // 8),
        "v_proj": (0, torch.arange(16) // 8),
        "o_proj": (1, torch.arange(32) // 16),
    }
    weights = {key: getattr(attn, key).weight for key in index}
    parts = [
        (weights[key], dim, lambda j, units=units: (units == j).nonzero().flatten().tolist())
        for key, (dim, units) in index.items()
    ]
    scale = explicit_norms(parts, 2).mean().sqrt()
    us = {key: (w.detach() / scale).requires_grad_() for key, w in weights.items()}
    v = torch.full((2,), float(scale), requires_grad=True)
    own = [p for n, p in reference.named_parameters() if n.startswith(f"{name}.") and n.endswith("_proj.weight")]
    others = [p for p in reference.parameters() if all(p is not q for q in own)]
    optimizer = torch.optim.SGD([*us.values(), v, *others], lr=0.05, momentum=0.9)
    data = token_data(n=24)
    for (tokens,) in data:
        optimizer.zero_grad()
        for key, (dim, units) in index.items():
            shape = [1, 1]
            shape[dim] = -1
            del getattr(attn, key).weight
            getattr(attn, key).weight = us[key] * v[units].reshape(shape)
        loss = reference.training_step((tokens,), 0) + lam / 2 * (
            sum(u.pow(2).sum() for u in us.values()) + v.pow(2).sum()
        )
        loss.backward()
        optimizer.step()
    spred = SpredCallback(lam, groups={name: "head"}, threshold=0.0, verbose=False, print_report=False)
    quiet_trainer(max_steps=3, callbacks=[spred]).fit(module, data)
    trained = module.model.model.layers[0].self_attn
    for key, (dim, units) in index.items():
        shape = [1, 1]
        shape[dim] = -1
        expected = (us[key] * v[units].reshape(shape)).detach()
        torch.testing.assert_close(getattr(trained, key).weight, expected, atol=1e-6, rtol=1e-5, msg=key)


def test_a_target_counts_heads_and_shrink_removes_the_others():
    seed_everything(0)
    gpt = tiny_gpt2()
    spred = SpredCallback(groups={"*.attn": "head", "*.mlp": "neuron"}, target_groups=3 + 128, verbose=False)
    quiet_trainer(max_steps=60, callbacks=[spred]).fit(LanguageModel(gpt), token_data())
    kept = {f.name.removeprefix("model."): int((f.norms() != 0).sum()) for f in spred.factorizations}
    assert sum(kept.values()) == 3 + 128  # heads and neurons in proportion to each term's units: 3 heads of 8
    heads = sum(n for name, n in kept.items() if name.endswith(".attn"))
    tokens = torch.randint(0, VOCAB, (4, 12))
    result = shrink(gpt.eval(), tokens)
    assert sum(n for name, n in result.removed.items() if name.endswith(".attn")) == 8 - heads
    assert sum(n for name, n in result.removed.items() if name.endswith(".mlp")) == 256 - (131 - heads)
    fresh = torch.randint(0, VOCAB, (4, 12))
    torch.testing.assert_close(result.model(fresh).logits, gpt(fresh).logits, atol=1e-5, rtol=1e-5)


def test_lam_max_of_zero_initialised_lora_ranks_is_a_scale_not_zero():
    from peft import LoraConfig, get_peft_model

    seed_everything(0)
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    spred = SpredCallback(groups={"*": "rank"}, target_groups=4, prune_by="path", verbose=False, print_report=False)
    quiet_trainer(max_steps=30, callbacks=[spred]).fit(LanguageModel(model), token_data())
    assert spred.steering.lam_max > 0  # lora_B = 0 at the start: the gradient at zero is zero for every lam
    assert sum(int((f.norms() != 0).sum()) for f in spred.factorizations) == 4  # ranks are what a target counts


def test_hugging_face_round_trips_keep_the_sparse_weights(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2LMHeadModel

    seed_everything(0)
    gpt = tiny_gpt2()
    quiet_trainer(max_steps=30, callbacks=[SpredCallback(target_sparsity=0.5, verbose=False)]).fit(
        LanguageModel(gpt), token_data()
    )
    gpt.save_pretrained(tmp_path / "gpt")
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt").eval()
    tokens = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(loaded(tokens).logits, gpt.eval()(tokens).logits, atol=0, rtol=0)
    zeros = int((gpt.transformer.h[0].attn.c_attn.weight == 0).sum())
    assert zeros > 0 and int((loaded.transformer.h[0].attn.c_attn.weight == 0).sum()) == zeros

    lora = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    base = {k: v.clone() for k, v in lora.base_model.model.state_dict().items() if "lora_" not in k}
    spred = SpredCallback(groups={"*": "rank"}, target_groups=3, verbose=False)
    quiet_trainer(max_steps=30, callbacks=[spred]).fit(LanguageModel(lora), token_data())
    lora.save_pretrained(tmp_path / "lora")
    fresh = tiny_gpt2()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in base.items()}, strict=False)
    again = PeftModel.from_pretrained(fresh, tmp_path / "lora").eval()
    torch.testing.assert_close(again(input_ids=tokens).logits, lora.eval()(input_ids=tokens).logits, atol=1e-6, rtol=0)
