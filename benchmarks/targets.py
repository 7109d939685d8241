"""Targets against gradual magnitude pruning, and the choices inside the controller, measured through the callback.

scikit-learn's digits (offline), a quarter held out per seed, SGD (lr 0.1, momentum 0.9) or Adam (lr 1e-3) with a
cosine learning rate, 30 epochs for every method:

- ``mlp``: 64-64-10, the README's plain MLP, every layer penalised (the ``target_sparsity`` snippet);
- ``cnn``: a BatchNorm CNN (32-64-64 channels), every conv and the classifier penalised.

Methods: ``gmp`` is the reference, global magnitude pruning on the cubic schedule over the first two thirds of the
steps, every 10 steps, then fine-tuning (``tests/helpers.py``); ``spred`` is ``SpredCallback(target_sparsity=s)``
with its defaults; ``spred-path`` the same with ``prune_by="path"`` (``lam`` rises until the weights leave by
themselves). ``--check-every`` compares the controller's check intervals. A cell is the test accuracy, mean ± std over
seeds, with the sparsity reached.

    python benchmarks/targets.py                                  # both networks, 90% and 98%, SGD and Adam
    python benchmarks/targets.py --nets mlp --check-every 1 10 50 --methods spred   # the check interval
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import seed_everything
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import DigitsMLP, GradualMagnitudePruning, accuracy, digits_data, quiet_trainer  # noqa: E402

from lightning_spred import SpredCallback  # noqa: E402

EPOCHS = 30


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.view(-1, 1, 8, 8))


def fit(net: str, optimizer: str, method: str, target: float, seed: int, check_every: int) -> tuple[float, float]:
    seed_everything(seed, verbose=False)
    data, (x, y) = digits_data(seed)
    model = DigitsMLP(optimizer=optimizer, steps=EPOCHS * len(data))
    if net == "cnn":
        model.net = DigitsCNN()
    if method == "gmp":
        callback = GradualMagnitudePruning(target)
    else:
        prune_by = "path" if method == "spred-path" else None
        callback = SpredCallback(target_sparsity=target, prune_by=prune_by, check_every=check_every, verbose=False,
                                 print_report=False)  # fmt: skip
    quiet_trainer(max_epochs=EPOCHS, callbacks=[callback]).fit(model, data)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return accuracy(model, x, y), zeros


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"])
    parser.add_argument("--optimizers", nargs="+", choices=["sgd", "adam"], default=["sgd", "adam"])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.98])
    parser.add_argument(
        "--methods", nargs="+", choices=["gmp", "spred", "spred-path"], default=["gmp", "spred", "spred-path"]
    )
    parser.add_argument("--check-every", type=int, nargs="+", default=[10], help="the controller's check intervals")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # the controller's own messages too
    start = time.perf_counter()
    print("| network | optimizer | target | method | check every | test accuracy | zeros |")
    print("|---|---|---|---|---|---|---|")
    for net in args.nets:
        for optimizer in args.optimizers:
            for target in args.targets:
                for method in args.methods:
                    for every in args.check_every if method != "gmp" else [10]:
                        runs = [fit(net, optimizer, method, target, seed, every) for seed in range(args.seeds)]
                        scores, zeros = [r[0] for r in runs], [r[1] for r in runs]
                        score = f"{statistics.mean(scores):.3f} ± {statistics.pstdev(scores):.3f}"
                        row = f"| {net} | {optimizer} | {target:.0%} | {method} | {every} | {score}"
                        print(f"{row} | {statistics.mean(zeros):.2%} |", flush=True)
    print(f"\n[{time.perf_counter() - start:.0f} s]")


if __name__ == "__main__":
    main()
