"""Steering lam: schedules, lam_max, targets, the path inside one fit, refits, and the warnings that go with them."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import (
    MLP,
    DigitsMLP,
    Interrupt,
    Regression,
    assert_same_lasso_solution,
    classification_data,
    diabetes,
    digits_data,
    full_batch,
    quiet_trainer,
    sklearn_lasso,
    spred_lasso,
)
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.linear_model import lasso_path
from torch import nn

from lightning_spred import Constant, GeometricRamp, LambdaSchedule, SpredCallback, Warmup, lam_max, stability_selection
from lightning_spred.features import FeatureSelection


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_schedules_give_their_values():
    assert [Warmup(0.2, steps=4)(s) for s in (0, 1, 4, 10)] == pytest.approx([0.0, 0.05, 0.2, 0.2])
    ramp = GeometricRamp(1e-3, 1e-1, steps=200, delay=100)
    assert [ramp(s) for s in (0, 100, 200, 300, 999)] == pytest.approx([1e-3, 1e-3, 1e-2, 1e-1, 1e-1])
    with pytest.raises(ValueError, match="gave lam=-1"):
        LambdaSchedule(lambda step: -1.0)(3)
    with pytest.raises(ValueError, match="`start` must be > 0"):
        GeometricRamp(0.0, 1.0, steps=10)


class SetLamAt(Callback):
    def __init__(self, spred, step, lam):
        self.spred, self.step, self.lam = spred, step, lam

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.spred.lam = self.lam


def test_changing_lam_during_fit_takes_effect_at_the_next_step():
    start = MLP()
    changed, scheduled = copy.deepcopy(start), copy.deepcopy(start)
    spred = SpredCallback(0.01, verbose=False)
    quiet_trainer(max_steps=12, callbacks=[spred, SetLamAt(spred, 6, 0.2)]).fit(changed, classification_data())
    schedule = LambdaSchedule(lambda step: 0.01 if step < 6 else 0.2)
    quiet_trainer(max_steps=12, callbacks=[SpredCallback(schedule, verbose=False)]).fit(
        scheduled, classification_data()
    )
    for name, value in weights(changed).items():
        torch.testing.assert_close(value, weights(scheduled)[name], atol=0, rtol=0, msg=name)
    assert spred.factorizations[0].lam == 0.2


@pytest.mark.parametrize("steering", ["ramp", "target"])
def test_resuming_in_the_middle_of_a_ramp_equals_an_uninterrupted_run(steering, tmp_path):
    def spred():
        if steering == "ramp":
            return SpredCallback(GeometricRamp(1e-3, 0.2, steps=24), threshold=1e-3, verbose=False)
        return SpredCallback(target_sparsity=0.3, lam_max=0.5, threshold=1e-3, refit_fraction=0.25, verbose=False)

    def fit(model, ckpt_path=None, name="run", stop=()):
        checkpoint = ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
        callbacks = [spred(), checkpoint, *stop]
        quiet_trainer(max_epochs=8, callbacks=callbacks, enable_checkpointing=True).fit(
            model, classification_data(), ckpt_path=ckpt_path
        )

    start = MLP()
    straight, resumed = copy.deepcopy(start), MLP()
    fit(straight)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(copy.deepcopy(start), name="interrupted", stop=[Interrupt(step=16)])  # at the start of epoch 4 of 8
    fit(resumed, ckpt_path=tmp_path / "interrupted" / "last.ckpt", name="resumed")
    for name, value in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[name], value, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("optimizer", [("sgd", 0.1), ("adam", 0.02)], ids=["sgd_momentum", "adam"])
def test_a_ramp_that_ends_holding_reaches_the_lasso_solution(optimizer):
    x, y = diabetes()
    alpha = 0.02
    ramp = GeometricRamp(2 * alpha / 100, 2 * alpha, steps=1500)
    weights = spred_lasso(x, y, alpha, optimizer[0], optimizer[1], steps=4000, lam=ramp)
    assert_same_lasso_solution(weights, sklearn_lasso(x, y, alpha))


def test_lam_max_is_where_the_lasso_path_ends():
    x, y = diabetes()
    alpha_max = np.abs(x.T.astype(np.float64) @ y).max() / len(y)  # scikit-learn's, for 1/(2n)||y - Xw||^2
    model = Regression(x.shape[1])
    data = next(iter(full_batch(x, y)))
    value = lam_max(lambda: model.training_step(data, 0), [model.linear.weight])
    assert value == pytest.approx(2 * alpha_max, rel=1e-5)  # MSELoss is twice sklearn's data term
    assert torch.all(model.linear.weight != 0)  # the weight is restored

    spred = SpredCallback(GeometricRamp(0.9, 2.0, steps=500, relative=True), verbose=False)
    quiet_trainer(max_steps=800, callbacks=[spred]).fit(Regression(x.shape[1], lr=0.05, steps=800), full_batch(x, y))
    assert spred.steering.lam_max == pytest.approx(2 * alpha_max, rel=1e-5)
    weight = spred.factorizations[0].weights[0]
    assert (weight == 0).all()  # above lam_max everything is zero


@pytest.mark.parametrize("k", [3, 6])
def test_a_target_selects_k_features_as_the_lasso_path_does(k):
    x, y = diabetes()
    alphas, coefs, _ = lasso_path(x.astype(np.float64), y.astype(np.float64), n_alphas=2000, eps=1e-4)
    counts = (coefs != 0).sum(axis=0)
    support = set(np.flatnonzero(coefs[:, np.flatnonzero(counts == k)[0]]))  # the first point with k features

    seed_everything(0)
    model = Regression(x.shape[1], lr=0.1, steps=3000)
    # one group per feature: the group lasso with groups of one is the lasso, and groups can be counted
    spred = SpredCallback(groups={"linear.weight": "input"}, target_groups=k, verbose=False)
    quiet_trainer(max_steps=3000, callbacks=[spred]).fit(model, full_batch(x, y))
    assert spred.steering.phase == "refit"
    selected = spred.selected_features()
    assert len(selected) == k
    assert set(selected.sorted_indices) == support


class PhaseWatch(Callback):
    def __init__(self, spred):
        self.spred, self.zeros_at_refit, self.lams = spred, None, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.spred.steering.phase == "refit" and self.zeros_at_refit is None:
            self.zeros_at_refit = [(w == 0).clone() for f in self.spred.factorizations for w in f.weights]
        self.lams.append(self.spred.factorizations[0].lam)


def test_a_sparsity_target_is_reached_held_and_the_refit_keeps_the_zeros():
    model = MLP(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    spred = SpredCallback(target_sparsity=0.6, prune_by="path", threshold=1e-3, refit_fraction=0.3, verbose=False)
    watch = PhaseWatch(spred)
    quiet_trainer(max_epochs=40, callbacks=[spred, watch]).fit(model, classification_data())
    assert spred.steering.reached_step is not None and spred.steering.phase == "refit"
    final = [(w == 0) for f in spred.factorizations for w in f.weights]
    zeros = sum(int(z.sum()) for z in final) / sum(z.numel() for z in final)
    assert zeros >= 0.6
    for at_refit, now in zip(watch.zeros_at_refit, final):
        assert torch.equal(at_refit, now)  # no penalty in the refit, and the zeros stay exactly zero
    refit_start = spred.steering.refit_step
    assert all(lam == 0 for lam in watch.lams[refit_start:])
    assert max(watch.lams[:refit_start]) > 0


def test_the_path_records_points_and_restores_the_chosen_one():
    model = MLP(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    model.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    val = classification_data(n=32, seed=1)
    spred = SpredCallback(
        GeometricRamp(1e-3, 0.5, steps=80),
        threshold=1e-3,
        modules=nn.Linear,
        groups={"net.0.weight": "input"},
        record_path=True,
        verbose=False,
    )
    trainer = quiet_trainer(max_epochs=30, callbacks=[spred])
    trainer.fit(model, classification_data(), val)
    path = spred.path
    assert len(path) == 30  # one point per validation
    assert [p.step for p in path] == [4 * (i + 1) for i in range(30)]
    lams = [p.lam for p in path]
    assert lams == sorted(lams)
    rows = path.table()
    assert {"step", "lam", "nonzeros", "sparsity", "groups/net.0.weight", "val_loss"} <= set(rows[0])

    best = path.best("val_loss", max_groups=6)
    assert best.groups["net.0.weight"] <= 6
    assert best.metrics["val_loss"] == min(p.metrics["val_loss"] for p in path if p.groups["net.0.weight"] <= 6)
    spred.restore(best)
    loss = sum(nn.functional.cross_entropy(model(x), y, reduction="sum") for x, y in val) / 32
    assert float(loss) == pytest.approx(best.metrics["val_loss"], abs=1e-5)
    with pytest.raises(ValueError, match="No path point has `val_acc`"):
        path.best("val_acc")


def test_features_ranked_by_when_they_leave_the_path():
    x, y = diabetes()
    seed_everything(0)
    model = Regression(x.shape[1], lr=0.1, steps=3000)
    spred = SpredCallback(GeometricRamp(0.01, 1.5, steps=2500, relative=True), groups={"linear.weight": "input"})
    quiet_trainer(max_steps=3000, callbacks=[spred]).fit(model, full_batch(x, y))
    # the lasso path's order of entry, read backwards, is the order in which features leave a rising lam
    alphas, coefs, _ = lasso_path(x.astype(np.float64), y.astype(np.float64), n_alphas=2000, eps=1e-4)
    entry = [int(np.flatnonzero(coefs[j])[0]) if coefs[j].any() else len(alphas) for j in range(x.shape[1])]
    for k in (1, 3, 5):
        expected = set(np.argsort(entry, kind="stable")[:k])
        assert set(spred.selected_features(k=k).sorted_indices) == expected
    chosen = spred.selected_features(k=3)
    assert chosen.get_support().sum() == 3 and chosen.transform(torch.from_numpy(x)).shape == (len(x), 3)
    assert all(math.isfinite(v) for v in chosen.exit_lam)


def test_feature_selection_follows_scikit_learn_and_fits_in_a_pipeline():
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    selection = FeatureSelection(sorted_indices=(1, 3), norms=(0.5, 2.0), n_features=4, sorted_names=("b", "d"))
    support = selection.get_support()
    assert isinstance(support, np.ndarray) and support.dtype == bool and support.tolist() == [False, True, False, True]
    assert selection.get_support(indices=True).tolist() == [1, 3]
    assert selection.ranked_indices() == [3, 1] and selection.ranked_names() == ["d", "b"]  # by norm
    assert selection.transform(np.arange(8).reshape(2, 4)).tolist() == [[1, 3], [5, 7]]
    assert selection.get_feature_names_out().tolist() == ["b", "d"]
    with pytest.raises(ValueError, match="has 3 columns"):
        selection.transform(np.ones((2, 3)))
    x, y = np.random.default_rng(0).normal(size=(40, 4)), np.arange(40) % 2
    pipeline = make_pipeline(selection, LogisticRegression()).fit(x, y)
    assert pipeline[-1].coef_.shape == (1, 2)
    assert clone(pipeline)[0] == selection


def test_a_run_that_cannot_leave_the_l2_phase_is_warned_about_early():
    def fit(lam):
        model = MLP(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(max_epochs=20, callbacks=[SpredCallback(lam, verbose=False)]).fit(
                model, classification_data()
            )
        return [str(w.message) for w in caught if "L2 phase" in str(w.message)]

    (message,) = fit(1e-4)
    assert "after 8 of 80 steps" in message and "reaches 0.9" in message
    assert fit(0.5) == []


def test_a_layer_that_dies_is_warned_about():
    model = MLP(optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    with pytest.warns(UserWarning, match=r"Every weight of `net.3.weight` is zero .* the layer is dead"):
        quiet_trainer(max_epochs=10, callbacks=[SpredCallback(2.0, threshold=1e-3, verbose=False)]).fit(
            model, classification_data()
        )


class ConvBN(MLP):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8)), nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3)
        )


def degenerate_warnings(model, **spred):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, callbacks=[SpredCallback(0.01, verbose=False, **spred)]).fit(
            model, classification_data()
        )
    return [str(w.message) for w in caught if "undoes its scale" in str(w.message) or "can move" in str(w.message)]


def test_degenerate_penalties_are_warned_about_and_a_plain_mlp_is_not():
    (absorbed,) = degenerate_warnings(ConvBN())
    assert absorbed.startswith("`net.1.weight` feeds a BatchNorm1d, which undoes its scale")
    first_only = MLP(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    first_only.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    (escape,) = degenerate_warnings(first_only, include=["net.0.weight"], modules=())
    assert escape.startswith("`net.0.weight`'s scale can move into the next Linear")

    def decayed(params):
        params = list(params)
        return torch.optim.Adam([{"params": params[:2]}, {"params": params[2:], "weight_decay": 1e-3}], lr=1e-2)

    with_decay = MLP(optimizer=decayed)
    with_decay.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    assert degenerate_warnings(with_decay, include=["net.0.weight"], modules=()) == []
    plain = MLP()
    plain.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    assert degenerate_warnings(plain) == []


class ExitSpy(Callback):
    """The step at which each input group of `net.0.weight` last became zero: the reference for the ranking."""

    def __init__(self):
        self.left = {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        dead = (pl_module.net[0].weight.abs().sum(dim=0) == 0).tolist()
        for group, is_dead in enumerate(dead):
            if is_dead and group not in self.left:
                self.left[group] = trainer.global_step
            elif not is_dead:
                self.left.pop(group, None)


def test_groups_that_leave_at_one_lam_are_ranked_by_when_they_left():
    # under a flat lam every group leaves at the same lam: the ranking must fall back on the step, not the index
    model = MLP(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    model.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    spred = SpredCallback(
        Constant(0.5), groups={"net.0.weight": "input"}, modules=nn.Linear, threshold=1e-3, verbose=False
    )
    spy = ExitSpy()
    quiet_trainer(max_epochs=40, callbacks=[spred, spy]).fit(model, classification_data())
    assert len(spy.left) >= 6  # most groups left, all at lam = 0.5
    last_to_leave = sorted(spy.left, key=lambda g: -spy.left[g])
    in_use = set(range(8)) - set(spy.left)
    for k in (len(in_use) + 1, len(in_use) + 3):
        expected = in_use | set(last_to_leave[: k - len(in_use)])
        assert set(spred.selected_features(k=k).sorted_indices) == expected


def test_a_fixed_lam_that_will_make_no_zeros_is_warned_about_early():
    model = MLP(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    with pytest.warns(UserWarning, match=r"`lam=1e-06` will make almost no zeros in this run: 0 after 8 of 80 steps"):
        quiet_trainer(max_epochs=20, callbacks=[SpredCallback(1e-6, verbose=False)]).fit(model, classification_data())
    with pytest.warns(UserWarning, match=r"`lam=1e-05` is 10,000 times below `lam_max=0.1` \(where every"):
        quiet_trainer(max_steps=2, callbacks=[SpredCallback(1e-5, lam_max=0.1, verbose=False)]).fit(
            MLP(), classification_data()
        )


def test_path_points_every_n_steps_carry_only_the_metrics_of_their_step():
    model = MLP(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    spred = SpredCallback(GeometricRamp(1e-3, 0.5, steps=40), record_path=2, verbose=False)
    quiet_trainer(max_epochs=10, callbacks=[spred]).fit(model, classification_data(), classification_data(seed=1))
    # validation runs at epoch ends (every 4 steps): only the points of those steps have `val_loss`
    assert [p.step for p in spred.path if "val_loss" in p.metrics] == list(range(4, 41, 4))
    assert all("val_loss" not in p.metrics for p in spred.path if p.step % 4)


def test_the_digits_mlp_at_a_tiny_lam_is_told_it_will_make_no_zeros():
    data, _ = digits_data(0)
    model = DigitsMLP(steps=20 * len(data))
    with pytest.warns(UserWarning, match=r"`lam=0.0001` is \d+ times below `lam_max=0.0\d+` \(where"):
        quiet_trainer(max_epochs=20, callbacks=[SpredCallback(1e-4, verbose=False)]).fit(model, data)
    assert int((model.net[0].weight == 0).sum()) < 0.01 * model.net[0].weight.numel()  # and it did not


def test_stability_selection_aggregates_paths_on_subsamples_as_the_lasso_paths_do():
    x, y = diabetes()

    def spred_path(rows):
        seed_everything(0)
        model = Regression(x.shape[1], lr=0.1, steps=2500)
        spred = SpredCallback(
            GeometricRamp(0.01, 1.5, steps=2000, relative=True), groups={"linear.weight": "input"}, verbose=False
        )
        quiet_trainer(max_steps=2500, callbacks=[spred]).fit(model, full_batch(x[rows], y[rows]))
        return spred.selected_features(k=x.shape[1])

    def lasso_order(rows):
        # the reference: the order in which features enter scikit-learn's exact path, read backwards
        _, coefs, _ = lasso_path(x[rows].astype(np.float64), y[rows].astype(np.float64), n_alphas=500, eps=1e-4)
        entry = [int(np.flatnonzero(c)[0]) if c.any() else coefs.shape[1] for c in coefs]
        return list(np.argsort(entry, kind="stable"))

    chosen = stability_selection(spred_path, n_samples=len(y), k=3, subsamples=3, seed=1)
    rng = np.random.default_rng(1)
    subsamples = [np.sort(rng.choice(len(y), size=round(0.5 * len(y)), replace=False)) for _ in range(3)]
    counts = np.zeros(x.shape[1])
    for rows in subsamples:
        counts[lasso_order(rows)[:3]] += 1
    assert chosen.frequency == tuple(counts[i] / 3 for i in chosen.sorted_indices)
    assert set(chosen.sorted_indices) == set(np.argsort(-counts, kind="stable")[:3])
