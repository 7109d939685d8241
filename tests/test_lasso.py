"""spred through the callback reaches scikit-learn's exact Lasso solution (the reference solver)."""

import numpy as np
import pytest
from helpers import assert_same_lasso_solution, diabetes, sklearn_lasso, spred_lasso, wide_sparse_problem

PROBLEMS = {"diabetes": (diabetes, 0.02), "wide": (wide_sparse_problem, 0.1)}
OPTIMIZERS = {"sgd_momentum": ("sgd", 0.1), "adam": ("adam", 0.02)}
STEPS = 4000


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_matches_sklearn_lasso(problem: str, optimizer: str) -> None:
    make_data, alpha = PROBLEMS[problem]
    x, y = make_data()
    reference = sklearn_lasso(x, y, alpha)
    assert 0 < np.count_nonzero(reference) < len(reference)  # a real selection problem
    name, lr = OPTIMIZERS[optimizer]
    assert_same_lasso_solution(spred_lasso(x, y, alpha, name, lr, STEPS), reference)
