"""Small models, data and a quiet Trainer shared by the tests."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Lasso
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spred import SpredCallback


def quiet_trainer(**kwargs: Any) -> Trainer:
    """A Trainer that prints and writes nothing unless asked to."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(**{**defaults, **kwargs})


class Regression(LightningModule):
    """A linear model without intercept trained with MSE, the Lasso's data term (times two)."""

    def __init__(self, features: int, optimizer: str = "sgd", lr: float = 0.1, steps: int = 1000) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 1, bias=False)
        self.optimizer, self.lr, self.steps = optimizer, lr, steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        if self.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        elif self.optimizer == "plain_sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class MLP(LightningModule):
    """A small classifier with biases and a norm layer, trained with Adam."""

    def __init__(
        self, features: int = 8, hidden: int = 16, classes: int = 3, optimizer: Callable | None = None
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )
        self.make_optimizer = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())


def classification_data(
    n: int = 64, features: int = 8, classes: int = 3, batch_size: int = 16, seed: int = 0
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = (x[:, :classes].argmax(dim=1)).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def one_sgd_step(weight: torch.Tensor, grad: torch.Tensor, lam: float, lr: float) -> torch.Tensor:
    """The weight after one plain SGD step of spred from its start ``u = w / c, v = c`` (``c = sqrt(mean|w|)``)."""
    scale = weight.detach().abs().mean().sqrt()
    u, v = weight.detach() / scale, torch.full_like(weight, scale)
    return (u - lr * (grad * v + lam * u)) * (v - lr * (grad * u + lam * v))


def standardise(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    y = (y - y.mean()) / y.std()
    return x.astype(np.float32), y.astype(np.float32)


def diabetes() -> tuple[np.ndarray, np.ndarray]:
    return standardise(*load_diabetes(return_X_y=True))


def wide_sparse_problem(n: int = 100, p: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """More features than samples, ten of them informative."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    w = np.zeros(p)
    w[:10] = rng.choice([-2.0, 2.0], 10) * rng.uniform(0.5, 1.0, 10)
    return standardise(x, x @ w + 0.5 * rng.standard_normal(n))


def full_batch(x: np.ndarray, y: np.ndarray) -> DataLoader:
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return DataLoader(dataset, batch_size=len(dataset))


def sklearn_lasso(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """scikit-learn's exact Lasso solution, in float64 to a tight tolerance: the reference of the Lasso tests."""
    solver = Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000)
    return solver.fit(x.astype(np.float64), y.astype(np.float64)).coef_


def spred_lasso(
    x: np.ndarray, y: np.ndarray, alpha: float, optimizer: str, lr: float, steps: int, lam: Any = None, **trainer: Any
):
    """The weights of a linear model trained full-batch through SpredCallback at its defaults."""
    seed_everything(0)
    model = Regression(x.shape[1], optimizer=optimizer, lr=lr, steps=steps)
    # nn.MSELoss is twice sklearn's data term, so lam = 2 * alpha.
    callback = SpredCallback(lam=2 * alpha if lam is None else lam, verbose=False)
    quiet_trainer(max_steps=steps, callbacks=[callback], **trainer).fit(model, full_batch(x, y))
    return model.linear.weight.detach().double().numpy().ravel()


def assert_same_lasso_solution(weights: np.ndarray, reference: np.ndarray) -> None:
    """Exact zeros where the reference has zeros, nonzeros where it has nonzeros, coefficients within 1e-3."""
    np.testing.assert_array_equal(weights != 0, reference != 0)
    assert np.abs(weights - reference).max() <= 1e-3


def digits_data(seed: int = 0, batch_size: int = 64) -> tuple[DataLoader, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's digits (8x8, offline): shuffled training batches and a held-out quarter."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).flatten(1)
    y = torch.tensor(digits.target)
    train, test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed, stratify=y)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True, generator=generator)
    return loader, (x[test], y[test])


class DigitsMLP(LightningModule):
    """A plain MLP on digits (no normalisation, no weight decay) with a cosine learning rate over ``steps``."""

    def __init__(self, hidden: int = 64, optimizer: str = "sgd", steps: int = 600) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.optimizer, self.steps = optimizer, steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        if self.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class DigitsConvBN(nn.Module):
    """A small BatchNorm CNN for digits, to put in ``DigitsMLP.net``: two conv-BN-ReLU blocks, pooling, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.view(-1, 1, 8, 8))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


class GradualMagnitudePruning(Callback):
    """The reference for targets: global magnitude pruning on a cubic schedule over the first two thirds of the steps
    (Zhu & Gupta 2017), every 10 steps, the pruned weights kept at zero; the last third fine-tunes."""

    def __init__(self, sparsity: float, every: int = 10) -> None:
        self.sparsity, self.every = sparsity, every

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.weights = [m.weight for m in pl_module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.end = int(2 / 3 * trainer.estimated_stepping_batches)
        self.masks = [torch.ones_like(w, dtype=torch.bool) for w in self.weights]

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        for w, mask in zip(self.weights, self.masks):
            if w.grad is not None:
                w.grad.mul_(mask)

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0 and step <= self.end:
            magnitudes = torch.cat([w.abs().flatten() for w in self.weights])
            count = int(round(self.sparsity * (1 - (1 - step / self.end) ** 3) * magnitudes.numel()))
            if count:
                cut = torch.kthvalue(magnitudes, count).values
                for w, mask in zip(self.weights, self.masks):
                    mask &= w.abs() > cut
        for w, mask in zip(self.weights, self.masks):
            w.mul_(mask)


class Interrupt(Callback):
    """Raises at the start of the batch of optimizer step ``step``: a crash in the middle of a fit."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("interrupted")
