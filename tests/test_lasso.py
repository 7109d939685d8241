"""spred through the callback reaches scikit-learn's exact Lasso solution (the reference solver)."""

import numpy as np
import pytest
from helpers import Regression, diabetes, full_batch, quiet_trainer, wide_sparse_problem
from lightning.pytorch import seed_everything
from sklearn.linear_model import Lasso

from lightning_spred import SpredCallback

PROBLEMS = {"diabetes": (diabetes, 0.02), "wide": (wide_sparse_problem, 0.1)}
OPTIMIZERS = {"sgd_momentum": ("sgd", 0.1), "adam": ("adam", 0.02)}
STEPS = 4000


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_matches_sklearn_lasso(problem: str, optimizer: str) -> None:
    make_data, alpha = PROBLEMS[problem]
    x, y = make_data()
    reference = Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000)
    reference = reference.fit(x.astype(np.float64), y.astype(np.float64)).coef_
    assert 0 < np.count_nonzero(reference) < len(reference)  # a real selection problem

    seed_everything(0)
    name, lr = OPTIMIZERS[optimizer]
    model = Regression(x.shape[1], optimizer=name, lr=lr, steps=STEPS)
    # nn.MSELoss is twice sklearn's data term, so lam = 2 * alpha; the callback runs at its defaults.
    quiet_trainer(max_steps=STEPS, callbacks=[SpredCallback(lam=2 * alpha, verbose=False)]).fit(model, full_batch(x, y))

    weights = model.linear.weight.detach().double().numpy().ravel()
    np.testing.assert_array_equal(weights != 0, reference != 0)
    assert np.abs(weights - reference).max() <= 1e-3
