"""Units that span several tensors: attention heads, feed-forward neurons, LoRA ranks.

A unit is what a transformer loses as a whole when it is pruned: an attention head is its rows of q, k and v together
with its columns of the output projection; a feed-forward neuron is a row (and bias) of the up projections (``fc1``,
or ``gate`` and ``up``) with the matching column of the down projection; a LoRA rank is a row of ``lora_A`` with the
column of ``lora_B``. Each tensor's part of the units is a *slice*: a view of the tensor in which one dimension indexes
the units (a fused ``qkv`` weight ``(3 * H * d, E)`` is viewed as ``(3, H, d, E)``, heads along dimension 1). One
shared spred factor per unit over all the slices gives the exact group lasso over the whole unit.

Structures are recognised by the modules' attributes, the way Hugging Face, timm, peft and PyTorch lay them out, without
importing those libraries: see :data:`ATTENTION_LAYOUTS` and :data:`MLP_LAYOUTS`. With grouped-query attention
(fewer key-value heads than query heads) the unit is a key-value head with the query heads that read it: a query
head alone cannot be removed without leaving its key and value behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from lightning_spred.layouts import layout_of

__all__ = ["ATTENTION_LAYOUTS", "MLP_LAYOUTS", "Slice", "Units", "find_units"]


@dataclass(frozen=True, eq=False)
class Slice:
    """One tensor's part in a set of units.

    Attributes:
        module: the module that owns the tensor.
        attr: the tensor's attribute name on ``module``.
        path: the module's name in the model.
        dim: the dimension of :attr:`shape` that indexes the units.
        shape: the view of the tensor in which :attr:`dim` indexes the units (``None``: the tensor's own shape).
        role: what the tensor does in the unit: ``"q"``, ``"k"``, ``"v"``, ``"qkv"`` (q, k and v stacked along the
            dimension before :attr:`dim`), ``"gate"`` (a gate on a head's output), ``"o"`` (the output projection);
            ``"up"``, ``"down"``; ``"a"``, ``"b"`` (LoRA).
    """

    module: nn.Module
    attr: str
    path: str
    dim: int
    shape: Optional[tuple[int, ...]] = None
    role: str = ""

    @property
    def name(self) -> str:
        return f"{self.path}.{self.attr}" if self.path else self.attr


@dataclass(frozen=True, eq=False)
class Units:
    """The units of one module (all heads of an attention, all neurons of a feed-forward block, one adapter's ranks).

    Attributes:
        kind: ``"head"``, ``"neuron"`` or ``"rank"``.
        name: the module's name (with the adapter's for ranks): the name of the penalty term.
        module: the module (the attention, the feed-forward block, the LoRA layer).
        count: how many units.
        slices: each tensor's part.
        per_unit: query heads per unit (grouped-query attention), else 1.
    """

    kind: str
    name: str
    module: nn.Module
    count: int
    slices: tuple[Slice, ...]
    per_unit: int = 1


#: Attention with separate projections, as (q, k, v, output) attribute paths: Llama, Mistral, Qwen (``o_proj``), OPT,
#: BART, CLIP (``out_proj``), BERT and RoBERTa's ``BertAttention`` (``self.query``, ``output.dense``), Hugging Face ViT.
ATTENTION_LAYOUTS: tuple[tuple[str, str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q_proj", "k_proj", "v_proj", "out_proj"),
    ("self.query", "self.key", "self.value", "output.dense"),
    ("attention.query", "attention.key", "attention.value", "output.dense"),
)

#: Feed-forward blocks, as (up projections, down projection): Llama's SwiGLU, Mixtral's experts, timm's ``Mlp`` and
#: OPT, GPT-2 (``Conv1D``), PyTorch's ``nn.TransformerEncoderLayer``, BERT's ``BertLayer``, GPT-NeoX.
MLP_LAYOUTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("gate_proj", "up_proj"), "down_proj"),
    (("w1", "w3"), "w2"),
    (("fc1",), "fc2"),
    (("c_fc",), "c_proj"),
    (("linear1",), "linear2"),
    (("intermediate.dense",), "output.dense"),
    (("dense_h_to_4h",), "dense_4h_to_h"),
)

_HEAD_DIMS = ("head_dim", "attention_head_size", "head_size")


def find_units(kind: str, module: nn.Module, path: str) -> list[Units]:
    """The units of ``kind`` in ``module`` (at ``path``), or ``[]`` when it does not have that structure.

    Raises:
        ValueError: the module has the structure but its units cannot be separated (a normalisation across heads,
            sizes that do not divide into heads).

    Example:
        >>> attention = nn.MultiheadAttention(8, num_heads=2)
        >>> for part in find_units("head", attention, "attn")[0].slices:
        ...     print(part.name, part.shape, part.dim)
        attn.in_proj_weight (3, 2, 4, 8) 1
        attn.in_proj_bias (3, 2, 4) 1
        attn.out_proj.weight (8, 2, 4) 1
    """
    return FINDERS[kind](module, path)


def _heads(module: nn.Module, path: str) -> list[Units]:
    if isinstance(module, nn.MultiheadAttention):
        return [_torch_attention(module, path)]
    fused = _child(module, "qkv"), _child(module, "proj")
    if isinstance(fused[0], nn.Linear) and isinstance(fused[1], nn.Linear) and hasattr(module, "num_heads"):
        return [_fused_heads(module, path, "qkv", "proj", dim=0)]
    fused = _child(module, "c_attn"), _child(module, "c_proj")
    if fused[0] is not None and fused[1] is not None and hasattr(module, "num_heads"):
        if hasattr(module, "q_attn"):
            raise ValueError(f"`{path}` is a cross-attention (GPT-2's `q_attn`): its heads are not grouped.")
        return [_fused_heads(module, path, "c_attn", "c_proj", dim=_output_dim(fused[0], path))]
    for names in ATTENTION_LAYOUTS:
        layers = [_child(module, n) for n in names]
        if all(isinstance(layer, nn.Linear) for layer in layers):
            return [_separate_heads(module, path, names, layers)]  # type: ignore[arg-type]
    return []


def _torch_attention(module: nn.MultiheadAttention, path: str) -> Units:
    heads, size, embed = module.num_heads, module.head_dim, module.embed_dim
    slices = []
    if module._qkv_same_embed_dim:
        slices.append(Slice(module, "in_proj_weight", path, 1, (3, heads, size, embed), "qkv"))
    else:
        for attr, role in (("q_proj_weight", "q"), ("k_proj_weight", "k"), ("v_proj_weight", "v")):
            width = module._parameters[attr].shape[1]  # type: ignore[union-attr]
            slices.append(Slice(module, attr, path, 0, (heads, size, width), role))
    if module.in_proj_bias is not None:
        slices.append(Slice(module, "in_proj_bias", path, 1, (3, heads, size), "qkv"))
    for attr, role in (("bias_k", "k"), ("bias_v", "v")):
        if getattr(module, attr, None) is not None:
            slices.append(Slice(module, attr, path, 2, (1, 1, heads, size), role))
    out = module.out_proj
    slices.append(Slice(out, "weight", _join(path, "out_proj"), 1, (out.out_features, heads, size), "o"))
    return Units("head", path, module, heads, tuple(slices))


def _fused_heads(module: nn.Module, path: str, qkv_name: str, out_name: str, dim: int) -> Units:
    """q, k and v in one projection (timm's ``qkv``, GPT-2's ``c_attn``), heads contiguous within each third."""
    if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
        raise ValueError(f"`{path}` normalises across its heads (`norm`): its heads cannot be told apart.")
    qkv, out = _child(module, qkv_name), _child(module, out_name)
    heads = int(module.num_heads)
    weight = qkv.weight
    width = weight.shape[dim]
    size = int(getattr(module, "head_dim", 0)) or width // (3 * heads)
    if width != 3 * heads * size:
        raise ValueError(f"`{path}.{qkv_name}` has {width} outputs, not 3 x {heads} heads x {size}: not fused q, k, v.")
    view = list(weight.shape)
    view[dim : dim + 1] = [3, heads, size]
    slices = [Slice(qkv, "weight", _join(path, qkv_name), dim + 1, tuple(view), "qkv")]
    if getattr(qkv, "bias", None) is not None:
        slices.append(Slice(qkv, "bias", _join(path, qkv_name), 1, (3, heads, size), "qkv"))
    gate = _child(module, "gate")
    if isinstance(gate, nn.Linear):  # timm's gated attention: one sigmoid gate per output of a head
        slices.append(Slice(gate, "weight", _join(path, "gate"), 0, (heads, size, gate.in_features), "gate"))
        if gate.bias is not None:
            slices.append(Slice(gate, "bias", _join(path, "gate"), 0, (heads, size), "gate"))
    slices.append(_input_slice(out, _join(path, out_name), heads, size))
    return Units("head", path, module, heads, tuple(slices))


def _separate_heads(module: nn.Module, path: str, names: tuple[str, ...], layers: list[nn.Linear]) -> Units:
    q, k, v, out = layers
    size = next(
        (int(getattr(m, a)) for m in (module, _parent(module, names[0])) for a in _HEAD_DIMS if hasattr(m, a)), 0
    )
    if not size:
        raise ValueError(f"`{path}` has separate q, k, v projections but no `head_dim` to split them into heads.")
    heads, kv_heads = q.out_features // size, k.out_features // size
    if heads * size != q.out_features or kv_heads * size != k.out_features or not kv_heads or heads % kv_heads:
        raise ValueError(
            f"`{path}`: {q.out_features} query and {k.out_features} key outputs do not divide into heads of {size}."
        )
    per_unit = heads // kv_heads  # query heads that read one key-value head
    slices = [Slice(q, "weight", _join(path, names[0]), 0, (kv_heads, per_unit * size, q.in_features), "q")]
    if q.bias is not None:
        slices.append(Slice(q, "bias", _join(path, names[0]), 0, (kv_heads, per_unit * size), "q"))
    for layer, name, role in ((k, names[1], "k"), (v, names[2], "v")):
        slices.append(Slice(layer, "weight", _join(path, name), 0, (kv_heads, size, layer.in_features), role))
        if layer.bias is not None:
            slices.append(Slice(layer, "bias", _join(path, name), 0, (kv_heads, size), role))
    slices.append(_input_slice(out, _join(path, names[3]), kv_heads, per_unit * size))
    return Units("head", path, module, kv_heads, tuple(slices), per_unit)


def _neurons(module: nn.Module, path: str) -> list[Units]:
    for up_names, down_name in MLP_LAYOUTS:
        ups, down = [_child(module, n) for n in up_names], _child(module, down_name)
        if down is None or any(up is None for up in ups):
            continue
        if any(layout_of(m, "weight") is None for m in (*ups, down)):
            continue
        slices = []
        widths = set()
        for up, name in zip(ups, up_names):
            dim = _output_dim(up, _join(path, name))
            widths.add(up.weight.shape[dim])
            slices.append(Slice(up, "weight", _join(path, name), dim, role="up"))
            if getattr(up, "bias", None) is not None:
                slices.append(Slice(up, "bias", _join(path, name), 0, role="up"))
        dim = layout_of(down, "weight").input  # type: ignore[union-attr]
        widths.add(down.weight.shape[dim])
        if len(widths) != 1 or dim is None:
            raise ValueError(f"`{path}`: the up and down projections' hidden sizes differ ({sorted(widths)}).")
        slices.append(Slice(down, "weight", _join(path, down_name), dim, role="down"))
        return [Units("neuron", path, module, widths.pop(), tuple(slices))]
    return []


def _ranks(module: nn.Module, path: str) -> list[Units]:
    """peft's LoRA layers: ``lora_A[adapter]`` (``r`` outputs) and ``lora_B[adapter]`` (``r`` inputs)."""
    a_layers, b_layers = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if not isinstance(a_layers, nn.ModuleDict) or not isinstance(b_layers, nn.ModuleDict):
        return []
    found = []
    for adapter, a in a_layers.items():
        b = b_layers[adapter]
        a_path, b_path = _join(path, f"lora_A.{adapter}"), _join(path, f"lora_B.{adapter}")
        dim_a, dim_b = _output_dim(a, a_path), layout_of(b, "weight")
        if dim_b is None or dim_b.input is None or a.weight.shape[dim_a] != b.weight.shape[dim_b.input]:
            raise ValueError(f"`{path}`: adapter {adapter!r} has no matching rank dimension in lora_A and lora_B.")
        slices = (Slice(a, "weight", a_path, dim_a, role="a"), Slice(b, "weight", b_path, dim_b.input, role="b"))
        name = f"{path}[{adapter}]" if path else f"[{adapter}]"
        found.append(Units("rank", name, module, a.weight.shape[dim_a], slices))
    return found


FINDERS: dict[str, Callable[[nn.Module, str], list[Units]]] = {"head": _heads, "neuron": _neurons, "rank": _ranks}


def _input_slice(layer: nn.Module, path: str, units: int, size: int) -> Slice:
    """The output projection's inputs, split into ``units`` of ``size`` consecutive features."""
    layout = layout_of(layer, "weight")
    if layout is None or layout.input is None:
        raise ValueError(f"`{path}` is not a projection whose input features are known.")
    view = list(layer.weight.shape)
    view[layout.input : layout.input + 1] = [units, size]
    return Slice(layer, "weight", path, layout.input, tuple(view), "o")


def _output_dim(layer: nn.Module, path: str) -> int:
    layout = layout_of(layer, "weight")
    if layout is None:
        raise ValueError(f"`{path}` ({type(layer).__name__}) is not a projection whose outputs are known.")
    return layout.output


def _child(module: nn.Module, dotted: str) -> Optional[nn.Module]:
    for name in dotted.split("."):
        module = module._modules.get(name)  # type: ignore[assignment]
        if module is None:
            return None
    return module


def _parent(module: nn.Module, dotted: str) -> nn.Module:
    head, _, _ = dotted.rpartition(".")
    return _child(module, head) if head else module  # type: ignore[return-value]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
