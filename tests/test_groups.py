"""Group sparsity against independent group-lasso solvers, feature selection output, and shrinking."""

import csv

import numpy as np
import pytest
import torch
from helpers import classification_data, quiet_trainer, standardise
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.loggers import CSVLogger
from skglm import GroupLasso
from sklearn.linear_model import MultiTaskLasso
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spred import SpredCallback
from lightning_spred.shrink import shrink

STEPS = 4000
OPTIMIZERS = {
    "sgd_momentum": lambda p, steps: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p, steps: torch.optim.Adam(p, lr=0.02),
}


class LeastSquares(LightningModule):
    """``sum_k mean_n (y_nk - f(x)_nk)^2``: twice scikit-learn's (and skglm's) data term ``1/(2n) ||Y - f(X)||^2``."""

    def __init__(self, model: nn.Module, optimizer: str) -> None:
        super().__init__()
        self.model, self.optimizer = model, optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        residual = self.model(x) - y
        return residual.pow(2).reshape(len(x), -1).sum(dim=1).mean()

    def configure_optimizers(self):
        optimizer = OPTIMIZERS[self.optimizer](self.parameters(), STEPS)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class GroupedFeatures(nn.Module):
    """A linear model whose coefficients are stored as (groups, group size): contiguous feature groups."""

    def __init__(self, groups: int, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(groups, size) * 0.1)

    def forward(self, x):
        return x @ self.weight.reshape(-1)


def multitask_problem(n=100, p=40, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    w = np.zeros((p, k))
    w[:6] = rng.standard_normal((6, k))
    y = x @ w + 0.5 * rng.standard_normal((n, k))
    x, _ = standardise(x, y[:, 0])
    return x, ((y - y.mean(0)) / y.std(0)).astype(np.float32)


def train(model: nn.Module, x, y, callback, optimizer, logger=False):
    seed_everything(0)
    data = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=len(x))
    trainer = quiet_trainer(max_steps=STEPS, callbacks=[callback], logger=logger, log_every_n_steps=500)
    trainer.fit(LeastSquares(model, optimizer), data)
    return trainer


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_input_groups_match_multitask_lasso(optimizer, tmp_path):
    x, y = multitask_problem()
    alpha = 0.1
    solver = MultiTaskLasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000)
    reference = solver.fit(x.astype(np.float64), y.astype(np.float64)).coef_
    selected = np.flatnonzero(np.linalg.norm(reference, axis=0))
    assert 0 < len(selected) < x.shape[1]

    linear = nn.Linear(x.shape[1], y.shape[1], bias=False)
    callback = SpredCallback(2 * alpha, groups={"model.weight": "input"}, verbose=False)
    trainer = train(linear, x, y, callback, optimizer, logger=CSVLogger(tmp_path))

    weights = linear.weight.detach().double().numpy()
    assert np.abs(weights - reference).max() <= 1e-3
    names = [f"gene{j}" for j in range(x.shape[1])]
    features = callback.selected_features(names=names)
    assert list(features.sorted_indices) == selected.tolist()
    assert list(features.sorted_names) == [names[j] for j in selected]
    np.testing.assert_allclose(features.norms, np.linalg.norm(reference, axis=0)[selected], atol=1e-3)
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        logged = [
            float(r["spred/groups/model.weight"]) for r in csv.DictReader(handle) if r["spred/groups/model.weight"]
        ]
    assert logged[-1] == len(selected)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_feature_groups_match_skglm_group_lasso(optimizer):
    x, y = multitask_problem()
    y = np.ascontiguousarray(y[:, 0])
    alpha, size = 0.1, 4
    solver = GroupLasso(groups=size, alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=1000)
    reference = solver.fit(x.astype(np.float64), y.astype(np.float64)).coef_  # float32 never reaches tol=1e-12
    active = np.linalg.norm(reference.reshape(-1, size), axis=1) > 0
    assert 0 < active.sum() < len(active)

    model = GroupedFeatures(x.shape[1] // size, size)
    callback = SpredCallback(2 * alpha, include=["model.weight"], groups={"model.weight": 0}, verbose=False)
    train(model, x, y, callback, optimizer)

    weights = model.weight.detach().double().numpy()
    np.testing.assert_array_equal(np.linalg.norm(weights, axis=1) > 0, active)
    assert np.abs(weights.reshape(-1) - reference).max() <= 1e-3
    assert (weights[~active] == 0).all()  # dead groups are zero whole, live groups keep every entry


class Classifier(LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_pruned_units_are_removed_and_outputs_unchanged(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
        data, example = classification_data(n=64), torch.randn(16, 8)
        groups = {"net.0.weight": "output", "net.2.weight": "output"}
    else:
        net = nn.Sequential(
            nn.Conv1d(1, 16, 3), nn.ReLU(), nn.Conv1d(16, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4, 3)
        )
        loader = classification_data(n=64)
        data = [(x.unsqueeze(1), y) for x, y in loader]
        data = DataLoader(
            TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])), batch_size=16
        )
        example = torch.randn(16, 1, 8)
        groups = {"net.0.weight": "output", "net.2.weight": "output"}
    quiet_trainer(max_epochs=60, callbacks=[SpredCallback(0.02, threshold=1e-3, groups=groups, verbose=False)]).fit(
        Classifier(net), data
    )
    dead = {name: int((net[int(name[4])].weight.flatten(1).abs().sum(1) == 0).sum()) for name in groups}
    assert all(count > 0 for count in dead.values()), dead

    result = shrink(net, example)
    assert result.removed == {name[4]: count for name, count in dead.items()}
    assert result.model[0].weight.shape[0] == net[0].weight.shape[0] - dead["net.0.weight"]
    fresh = torch.randn_like(example)
    torch.testing.assert_close(result.model(fresh), net.eval()(fresh), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in net.parameters())


def test_selected_features_errors():
    callback = SpredCallback(0.1)
    with pytest.raises(RuntimeError, match="No fit with `groups=`"):
        callback.selected_features()
