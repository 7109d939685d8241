"""Channel pruning that makes a CNN smaller and faster: spred's channel groups next to the usual pruning methods.

A BatchNorm CNN (32-64-64 channels, 160 prunable) is trained on scikit-learn's digits (offline). Every method
ends with the same number of channels, removed for real with `lightning_spred.shrink` (a removed channel's filter,
bias and BatchNorm scale and shift are zero), within the same number of epochs and with the same optimizer:

- spred target: `groups={conv: "channel"}` (each filter with its bias and BatchNorm), `target_groups` = the
  channels to keep (lam rises until they are left), the last 30% of the epochs an un-penalised refit with the
  zeros kept;
- spred, then prune: the same channel groups at a fixed `lam` (1e-3, as naive group L1) for 70% of the epochs,
  then the weakest channel groups of each layer removed and fine-tuning, like the methods below;
- torch-pruning's magnitude pruning (L1 norm of the filters, the same fraction in every layer) after 70% of the
  epochs, then fine-tuning;
- network slimming (L1 on the BatchNorm scales, torch-pruning's `BNScalePruner`, global threshold), then
  fine-tuning;
- naive group L1: the same group penalty as spred in the loss, then the weakest channels of each layer removed,
  fine-tuning;
- gradual magnitude pruning: torch-pruning's magnitude pruner in 10 steps over the first 70% of the epochs,
  then fine-tuning.

Each cell is the mean ± std over seeds of the test accuracy of the shrunk network; MACs and CPU latency (batch
256, eval mode, measured next to the dense network in the same process) are given relative to the dense network.

    python examples/compression.py                    # SGD and Adam, 3 seeds, 50/75/90% of channels removed
    python examples/compression.py --seeds 1 --fractions 0.75 --optimizers sgd --epochs 10   # quick look

Writes `<out>/channels_removed.png` and `<out>/results.csv` (default `outputs/compression`).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch_pruning as tp
from common import Classifier, accuracy, label, pyplot, quiet_trainer, save
from lightning.pytorch import Callback, seed_everything
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spred import SpredCallback, shrink

CONVS = ("net.0", "net.3", "net.7")  # the prunable layers
LR = {"sgd": 0.05, "adam": 3e-3}


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def channels(net: nn.Module) -> int:
    return sum(net[int(path[4:])].out_channels for path in CONVS)


def train(net: nn.Module, data: DataLoader, epochs: int, args, optimizer: str, callbacks=(), naive=0.0) -> nn.Module:
    """Weight decay 5e-4 on the classifier, as a user would have it (and so that the last channels cannot hand it
    their scale); a cosine learning rate over the phase."""
    model = Classifier(net, lr=LR[optimizer], steps=epochs * len(data), optimizer=optimizer,
                       weight_decay={"net.12.weight": 5e-4})  # fmt: skip
    if naive:
        model.training_step = naive_group_l1(model, naive)  # type: ignore[method-assign]
    quiet_trainer(list(callbacks), max_epochs=epochs).fit(model, data)
    return model.net


def naive_group_l1(model: Classifier, lam: float) -> Callable:
    """``loss + lam * sum_c ||(filter_c, bias_c, gamma_c, beta_c)||``: spred's channel penalty, by autograd."""

    def training_step(batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(model.net(x), y)
        for path in CONVS:
            conv, norm = model.net[int(path[4:])], model.net[int(path[4:]) + 1]
            parts = [conv.weight.flatten(1), conv.bias[:, None], norm.weight[:, None], norm.bias[:, None]]
            loss = loss + lam * torch.cat(parts, dim=1).norm(dim=1).sum()
        return loss

    return training_step


def channel_norms(net: nn.Module) -> list[torch.Tensor]:
    norms = []
    for path in CONVS:
        conv, norm = net[int(path[4:])], net[int(path[4:]) + 1]
        parts = [conv.weight.flatten(1), conv.bias[:, None], norm.weight[:, None], norm.bias[:, None]]
        norms.append(torch.cat(parts, dim=1).detach().norm(dim=1))
    return norms


@torch.no_grad()
def zero_weakest(net: nn.Module, fraction: float) -> nn.Module:
    """Zero the channel groups with the smallest norms, the same fraction in every layer (as torch-pruning's
    magnitude pruner does: a ranking across layers would compare scales that differ from layer to layer)."""
    for path, norms in zip(CONVS, channel_norms(net)):
        removed = torch.argsort(norms)[: int(round(fraction * len(norms)))]
        conv, norm = net[int(path[4:])], net[int(path[4:]) + 1]
        for tensor in (conv.weight, conv.bias, norm.weight, norm.bias):
            tensor[removed] = 0
    return net


def shrunk(net: nn.Module, example: torch.Tensor) -> nn.Module:
    return shrink(net.eval(), example).model.train()


def spred_target(data, example, args, optimizer, fraction, dense_channels):
    keep = dense_channels - int(round(fraction * dense_channels))
    groups = {f"{path}.weight": "channel" for path in CONVS}
    callback = SpredCallback(groups=groups, target_groups=keep, refit_fraction=0.3, threshold=1e-3, verbose=False,
                             print_report=False)  # fmt: skip
    net = train(cnn(), data, args.epochs, args, optimizer, [callback])
    return shrunk(net, example)


def prune_then_finetune(prune: Callable, callbacks: Callable[[], list] = list, naive: float = 0.0) -> Callable:
    """Train 70% of the epochs (with ``callbacks`` and ``naive`` group L1), prune, fine-tune the rest."""

    def method(data, example, args, optimizer, fraction, dense_channels):
        first = int(round(0.7 * args.epochs))
        net = train(cnn(), data, first, args, optimizer, callbacks(), naive)
        net = prune(net.eval(), fraction, example)
        return train(net.train(), data, args.epochs - first, args, optimizer)

    return method


def magnitude(net, fraction, example):
    pruner = tp.pruner.MagnitudePruner(net, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=fraction, ignored_layers=[net[12]])  # fmt: skip
    pruner.step()
    return net


class Slimming(Callback):
    """Network slimming: L1 on the BatchNorm scales, added to their gradients after every backward pass."""

    def __init__(self, reg: float = 1e-4) -> None:
        self.reg = reg

    def on_after_backward(self, trainer, pl_module):
        for m in pl_module.net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.grad.add_(self.reg * torch.sign(m.weight.detach()))


def slimming_prune(net, fraction, example):
    pruner = tp.pruner.BNScalePruner(net, example, importance=tp.importance.BNScaleImportance(),
                                     pruning_ratio=fraction, global_pruning=True, ignored_layers=[net[12]])  # fmt: skip
    pruner.step()
    return net


def gradual(data, example, args, optimizer, fraction, dense_channels):
    """Magnitude pruning in up to 10 equal steps over the first 70% of the epochs, then fine-tuning. torch-pruning
    replaces the pruned parameters, so each stage trains with a new optimizer (and learning-rate cycle)."""
    first = int(round(0.7 * args.epochs))
    stages = max(1, min(10, first))
    net = cnn()
    pruner = tp.pruner.MagnitudePruner(
        net, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=fraction,
        iterative_steps=stages, ignored_layers=[net[12]],
    )  # fmt: skip
    for _ in range(stages):
        net = train(net, data, first // stages, args, optimizer)
        net.eval()
        pruner.step()
        net.train()
    return train(net, data, args.epochs - stages * (first // stages), args, optimizer)


class ChannelPenalty(SpredCallback):
    """spred's channel groups on the three convolutions at a fixed lam."""

    def __init__(self, lam: float) -> None:
        super().__init__(lam, groups={f"{path}.weight": "channel" for path in CONVS}, threshold=1e-3, verbose=False,
                         print_report=False)  # fmt: skip


METHODS = {
    "spred target": spred_target,
    "spred, then prune": prune_then_finetune(
        lambda net, f, example: shrunk(zero_weakest(net, f), example), callbacks=lambda: [ChannelPenalty(1e-3)]
    ),
    "torch-pruning magnitude": prune_then_finetune(magnitude),
    "network slimming": prune_then_finetune(slimming_prune, callbacks=lambda: [Slimming()]),
    "naive group L1": prune_then_finetune(lambda net, f, example: shrunk(zero_weakest(net, f), example), naive=1e-3),
    "gradual magnitude": gradual,
}


@torch.no_grad()
def latency_ratio(net: nn.Module, dense: nn.Module, x: torch.Tensor, repeats: int = 30) -> float:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.75, 0.9], help="channels removed")
    parser.add_argument("--optimizers", nargs="+", choices=list(LR), default=list(LR))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("outputs/compression"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    rows = []
    for seed in range(args.seeds):
        train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed, stratify=y)
        generator = torch.Generator().manual_seed(seed)
        data = DataLoader(TensorDataset(x[train_idx], y[train_idx]), batch_size=64, shuffle=True, generator=generator)
        x_test, y_test, example = x[test_idx], y[test_idx], x[train_idx[:8]]
        for optimizer in args.optimizers:
            seed_everything(seed, verbose=False)
            dense = train(cnn(), data, args.epochs, args, optimizer)
            dense_macs, _ = tp.utils.count_ops_and_params(dense.eval(), example)
            rows.append({"seed": seed, "optimizer": optimizer, "method": "dense", "fraction": 0.0, "removed": 0.0,
                         "accuracy": accuracy(dense, x_test, y_test), "macs": 1.0, "latency": 1.0})  # fmt: skip
            for fraction in args.fractions:
                for method in args.methods:
                    seed_everything(seed, verbose=False)
                    net = METHODS[method](data, example, args, optimizer, fraction, channels(cnn()))
                    macs, _ = tp.utils.count_ops_and_params(net.eval(), example)
                    row = {
                        "seed": seed, "optimizer": optimizer, "method": method, "fraction": fraction,
                        "removed": 1 - channels(net) / channels(cnn()), "accuracy": accuracy(net, x_test, y_test),
                        "macs": macs / dense_macs, "latency": latency_ratio(net, dense, x_test),
                    }  # fmt: skip
                    rows.append(row)
                    print(f"seed {seed} {optimizer:4} {fraction:.0%} {method:24} removed {row['removed']:.1%}"
                          f"  acc {row['accuracy']:.3f}  MACs {row['macs']:.2f}  latency {row['latency']:.2f}"
                          f"  [{time.perf_counter() - start:.0f}s]", flush=True)  # fmt: skip

    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary(rows, args)
    plot(rows, args)
    print(f"\nwrote {args.out / 'channels_removed.png'} and {args.out / 'results.csv'}  [{time.perf_counter() - start:.0f}s]")  # fmt: skip


def summary(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nTest accuracy of the shrunk network, mean ± std over {args.seeds} seeds (channels removed, MACs and"
          " latency / dense):")  # fmt: skip
    for optimizer in args.optimizers:
        dense = [r["accuracy"] for r in rows if r["optimizer"] == optimizer and r["method"] == "dense"]
        print(f"\n{optimizer}: dense {np.mean(dense):.3f} ± {np.std(dense):.3f}")
        print(f"{'method':24}" + "".join(f"{f'target: {f:.0%} removed':>36}" for f in args.fractions))
        for method in args.methods:
            cells = []
            for fraction in args.fractions:
                chosen = [
                    r for r in rows if (r["optimizer"], r["method"], r["fraction"]) == (optimizer, method, fraction)
                ]
                acc = [r["accuracy"] for r in chosen]
                removed, macs = np.mean([r["removed"] for r in chosen]), np.mean([r["macs"] for r in chosen])
                latency = np.mean([r["latency"] for r in chosen])
                cells.append(f"{np.mean(acc):.3f} ± {np.std(acc):.3f} ({removed:.0%}, {macs:.2f}, {latency:.2f}x)")
            print(f"{method:24}" + "".join(f"{c:>36}" for c in cells))


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    figure, axes = pyplot().subplots(1, len(args.optimizers), figsize=(6 * len(args.optimizers), 4), squeeze=False)
    for ax, optimizer in zip(axes[0], args.optimizers):
        for method in args.methods:
            points = [(f, [r["accuracy"] for r in rows if (r["optimizer"], r["method"], r["fraction"]) == (optimizer, method, f)])
                      for f in args.fractions]  # fmt: skip
            ax.errorbar([f for f, _ in points], [np.mean(a) for _, a in points], yerr=[np.std(a) for _, a in points],
                        marker="o", capsize=3, label=method)  # fmt: skip
        dense = np.mean([r["accuracy"] for r in rows if r["optimizer"] == optimizer and r["method"] == "dense"])
        ax.axhline(dense, color="gray", linestyle=":", label="dense")
        label(ax, "fraction of channels removed", "test accuracy (shrunk network)", f"digits, BN CNN, {optimizer}")
    save(figure, args.out / "channels_removed.png")


if __name__ == "__main__":
    main()
