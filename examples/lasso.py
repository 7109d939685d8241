"""A Lasso solved by SGD through SpredCallback, next to scikit-learn's (and skglm's, if installed) exact solvers.

Runs offline on data that ships with scikit-learn (diabetes) or on a compressed-sensing problem
(``n`` random measurements of a sparse signal with ``p`` unknowns). Prints the objective gap, the
agreement of the supports and the wall times of both solvers.

    python examples/lasso.py                          # compressed sensing, n=100, p=2000
    python examples/lasso.py --dataset diabetes
    python examples/lasso.py --features 20000 --steps 10000
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import Optional

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Lasso
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spred import SpredCallback


class LinearRegression(LightningModule):
    """``x @ w`` trained on the mean squared error with Adam and a cosine learning-rate decay."""

    def __init__(self, features: int, lr: float, steps: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 1, bias=False)
        nn.init.zeros_(self.linear.weight)
        self.lr, self.steps = lr, steps

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.linear(x).squeeze(-1), y)
        self.log("mse", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def compressed_sensing(n: int, p: int, nonzeros: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p)) / np.sqrt(n)
    signal = np.zeros(p)
    signal[rng.choice(p, nonzeros, replace=False)] = rng.standard_normal(nonzeros)
    return x, x @ signal + 0.01 * rng.standard_normal(n)


def objective(x: np.ndarray, y: np.ndarray, w: np.ndarray, alpha: float) -> float:
    """scikit-learn's Lasso objective ``1/(2n) ||y - Xw||^2 + alpha ||w||_1``."""
    return float(((y - x @ w) ** 2).mean() / 2 + alpha * np.abs(w).sum())


def solve_with_skglm(x: np.ndarray, y: np.ndarray, alpha: float) -> Optional[tuple[np.ndarray, float]]:
    """skglm's Lasso (same objective as scikit-learn's) and its wall time, when skglm is installed."""
    try:
        from skglm import Lasso as SkglmLasso
    except ImportError:
        return None
    SkglmLasso(alpha=alpha, fit_intercept=False).fit(x[:, :5], y)  # compile its numba kernels outside the timing
    start = time.perf_counter()
    coef = SkglmLasso(alpha=alpha, fit_intercept=False, tol=1e-10).fit(x, y).coef_
    return coef, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["sensing", "diabetes"], default="sensing")
    parser.add_argument("--samples", type=int, default=100, help="measurements (sensing)")
    parser.add_argument("--features", type=int, default=2000, help="unknowns (sensing)")
    parser.add_argument("--alpha-ratio", type=float, default=0.05, help="alpha as a fraction of alpha_max")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    if args.dataset == "diabetes":
        x, y = load_diabetes(return_X_y=True)
        x = (x - x.mean(0)) / x.std(0)
        y = (y - y.mean()) / y.std()
    else:
        x, y = compressed_sensing(args.samples, args.features, nonzeros=max(1, args.samples // 10), seed=args.seed)
    alpha = args.alpha_ratio * np.abs(x.T @ y).max() / len(y)  # alpha_max: the smallest alpha with w = 0

    start = time.perf_counter()
    reference = Lasso(alpha=alpha, fit_intercept=False, tol=1e-10, max_iter=100_000).fit(x, y).coef_
    sklearn_time = time.perf_counter() - start
    skglm_result = solve_with_skglm(x, y, alpha)

    seed_everything(args.seed, verbose=False)
    model = LinearRegression(x.shape[1], args.lr, args.steps)
    data = DataLoader(TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)), len(y))
    # nn.MSELoss is twice sklearn's data term: lam = 2 * alpha gives the same minimiser.
    trainer = Trainer(max_steps=args.steps, callbacks=[SpredCallback(lam=2 * alpha)], logger=False,
                      enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, data)
    spred_time = time.perf_counter() - start
    w = model.linear.weight.detach().double().numpy().ravel()

    gap = objective(x, y, w, alpha) - objective(x, y, reference, alpha)
    print(f"\n{args.dataset}: n={x.shape[0]}, p={x.shape[1]}, alpha={alpha:.4g} (lam={2 * alpha:.4g})")
    solvers = {"scikit-learn Lasso": (reference, sklearn_time), "spred (Lightning)": (w, spred_time)}
    if skglm_result is not None:
        solvers["skglm Lasso"] = skglm_result
    print(f"{'':22}" + "".join(f"{name:>20}" for name in solvers))
    print(f"{'nonzeros':22}" + "".join(f"{np.count_nonzero(c):>20}" for c, _ in solvers.values()))
    print(f"{'zeros (%)':22}" + "".join(f"{100 * np.mean(c == 0):>20.2f}" for c, _ in solvers.values()))
    print(f"{'objective':22}" + "".join(f"{objective(x, y, c, alpha):>20.8f}" for c, _ in solvers.values()))
    print(f"{'wall time (s)':22}" + "".join(f"{t:>20.2f}" for _, t in solvers.values()))
    print(f"relative objective gap: {gap / objective(x, y, reference, alpha):.2e}")
    print(
        f"same support: {bool(np.array_equal(w != 0, reference != 0))}, max |w - w_sklearn| = {np.abs(w - reference).max():.2e}"
    )
    off_support = np.abs(w[reference == 0])
    print(f"largest |w| where scikit-learn has 0: {off_support.max() if off_support.size else 0:.2e}")


if __name__ == "__main__":
    main()
