"""Network compression on scikit-learn's digits: spred next to magnitude pruning and naive L1.

For each `lam`, an MLP and a small CNN are trained with SpredCallback; the sparsity they end with is
then given to Lightning's `ModelPruning` (global L1-magnitude pruning half-way through the same
training), and the same `lam` is used as a naive L1 term in the loss. Test accuracy is reported
against the fraction of zero weights (Linear and Conv weights).

    python examples/compression.py                 # about 2-3 minutes on 2 CPU cores
    python examples/compression.py --epochs 5 --lams 1e-3   # quick look

Writes `<out>/accuracy_vs_sparsity.png` and `<out>/results.csv`.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from common import Classifier, accuracy, label, layer_weights, pyplot, quiet_trainer, save
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelPruning
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spred import Sparsity, SpredCallback


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip


def weight_sparsity(net: nn.Module, threshold: float = 0.0) -> float:
    metric = Sparsity(threshold)
    metric.update(layer_weights(net))
    return float(metric.compute())


def train(make_net: Callable[[], nn.Module], data: DataLoader, args: argparse.Namespace, callbacks=(), naive_l1=0.0):
    seed_everything(args.seed, verbose=False)
    model = Classifier(make_net(), lr=args.lr, steps=args.epochs * len(data), naive_l1=naive_l1)
    quiet_trainer(list(callbacks), max_epochs=args.epochs).fit(model, data)
    return model.net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lams", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--threshold", type=float, default=1e-3, help="weights at or below it count as zero (spred's authors: 1e-3)"
    )
    parser.add_argument("--models", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"])
    parser.add_argument("--out", type=Path, default=Path("outputs/compression"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.25, random_state=args.seed, stratify=y)
    data = DataLoader(TensorDataset(x[train_idx], y[train_idx]), batch_size=64, shuffle=True)
    x_test, y_test = x[test_idx], y[test_idx]

    rows = []
    for name in args.models:
        make_net = {"mlp": mlp, "cnn": cnn}[name]
        dense = train(make_net, data, args)
        rows.append(
            {"model": name, "method": "dense", "lam": 0.0, "sparsity": 0.0, "accuracy": accuracy(dense, x_test, y_test)}
        )
        for lam in args.lams:
            spred = train(make_net, data, args, [SpredCallback(lam, threshold=args.threshold, verbose=False)])
            sparsity = weight_sparsity(spred)
            pruning = ModelPruning(
                "l1_unstructured", amount=sparsity, use_global_unstructured=True, verbose=0,
                apply_pruning=lambda epoch: epoch == args.epochs // 2, make_pruning_permanent=True,
                use_lottery_ticket_hypothesis=False, parameter_names=["weight"],
                parameters_to_prune=None, resample_parameters=False,
            )  # fmt: skip
            pruned = train(make_net, data, args, [pruning])
            naive = train(make_net, data, args, naive_l1=lam)
            for method, net, zeros in (
                ("spred", spred, sparsity),
                ("magnitude pruning", pruned, weight_sparsity(pruned)),
                ("naive L1", naive, weight_sparsity(naive, args.threshold)),
            ):
                rows.append(
                    {
                        "model": name,
                        "method": method,
                        "lam": lam,
                        "sparsity": zeros,
                        "accuracy": accuracy(net, x_test, y_test),
                    }
                )
            print(f"{name} lam={lam:g}: " + ", ".join(f"{r['method']} {r['sparsity']:.1%} zeros acc {r['accuracy']:.3f}" for r in rows[-3:])
                  + f"  [{time.perf_counter() - start:.0f}s]", flush=True)  # fmt: skip

    print(f"\n{'model':6} {'method':18} {'lam':>8} {'zeros':>8} {'compression':>12} {'test acc':>9}")
    for r in rows:
        compression = 1 / (1 - r["sparsity"]) if r["sparsity"] < 1 else float("inf")
        print(
            f"{r['model']:6} {r['method']:18} {r['lam']:>8g} {r['sparsity']:>8.1%} {compression:>11.1f}x {r['accuracy']:>9.3f}"
        )
    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args)
    print(
        f"\nwrote {args.out / 'accuracy_vs_sparsity.png'} and {args.out / 'results.csv'}  [{time.perf_counter() - start:.0f}s]"
    )


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    figure, axes = pyplot().subplots(1, len(args.models), figsize=(5 * len(args.models), 4), squeeze=False)
    for ax, name in zip(axes[0], args.models):
        for method, marker in (("spred", "o"), ("magnitude pruning", "s"), ("naive L1", "^")):
            points = sorted(
                (r["sparsity"], r["accuracy"]) for r in rows if r["model"] == name and r["method"] == method
            )
            ax.plot(*zip(*points), marker=marker, label=method)
        dense = next(r["accuracy"] for r in rows if r["model"] == name and r["method"] == "dense")
        ax.axhline(dense, color="gray", linestyle=":", label="dense")
        label(ax, "fraction of zero weights", "test accuracy", f"digits, {name.upper()}")
    save(figure, args.out / "accuracy_vs_sparsity.png")


if __name__ == "__main__":
    main()
