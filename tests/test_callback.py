"""SpredCallback's life cycle: factorise at fit start, exact steps, merge back to the user's plain model."""

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MLP, classification_data, one_sgd_step, quiet_trainer
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from lightning_spred import GeometricRamp, SpredCallback
from lightning_spred.checks import check_strategy


def plain_snapshot(model: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_model(model: nn.Module, snapshot: dict) -> None:
    assert [n for n, _ in model.named_parameters()] == list(snapshot)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), snapshot[name]), name


class Inspect(Callback):
    """Records what the model looks like in the middle of a fit."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            self.names = [n for n, _ in pl_module.named_parameters()]
            self.keys = list(pl_module.state_dict())
            self.group_sizes = [len(g["params"]) for g in trainer.optimizers[0].param_groups]
            self.group_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
            self.optimizer_keys = list(trainer.optimizers[0].state_dict()["state"])


def test_during_fit_the_model_and_optimizer_are_the_plain_ones():
    model = MLP()
    names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())
    inspect = Inspect()
    quiet_trainer(max_steps=3, callbacks=[SpredCallback(0.1, verbose=False), inspect]).fit(model, classification_data())
    assert inspect.names == names and inspect.keys == keys
    assert inspect.group_sizes == [len(names)]  # the factors join the optimizer only inside its step
    assert all(any(p is q for q in model.parameters()) for p in inspect.group_params)
    # the optimizer's state has the plain layout: entries for the unpenalised parameters (the factors' moments are
    # kept by the callback), so it loads into the plain model's optimizer
    assert inspect.optimizer_keys == [i for i, n in enumerate(names) if n not in ("net.0.weight", "net.3.weight")]


def test_one_sgd_step_is_the_factorised_gradient_step():
    model = MLP(optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    data = classification_data(n=16, batch_size=16)
    reference = copy.deepcopy(model)
    lam, lr = 0.05, 0.5

    quiet_trainer(max_steps=1, callbacks=[SpredCallback(lam, threshold=0.0, verbose=False)]).fit(model, data)

    x, y = next(iter(data))
    nn.functional.cross_entropy(reference(x), y).backward()
    for name in ("net.0.weight", "net.3.weight"):
        w = reference.get_parameter(name)
        torch.testing.assert_close(model.get_parameter(name), one_sgd_step(w, w.grad, lam, lr))
    bias = reference.get_parameter("net.0.bias")
    torch.testing.assert_close(model.get_parameter("net.0.bias"), bias - lr * bias.grad)


def test_fit_returns_the_plain_model_with_exact_zeros():
    model = MLP()
    modules_before = {n: type(m) for n, m in model.named_modules()}
    params_before = {n: p for n, p in model.named_parameters()}
    callback = SpredCallback(0.05, threshold=1e-3, verbose=False)
    quiet_trainer(max_epochs=30, callbacks=[callback]).fit(model, classification_data())

    assert {n: type(m) for n, m in model.named_modules()} == modules_before
    assert dict(model.named_parameters()).keys() == params_before.keys()
    for name, p in model.named_parameters():
        assert type(p) is nn.Parameter and p is params_before[name]  # same objects: ties and references survive
    first = model.net[0].weight
    assert (first == 0).any() and (first != 0).any()
    assert ((first == 0) | (first.abs() > 1e-3)).all()  # nothing left between zero and the threshold
    fresh = MLP()
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_tied_weights_stay_one_weight():
    class Tied(MLP):
        def __init__(self):
            super().__init__(features=8, hidden=8, classes=8)
            self.net[3].weight = self.net[0].weight

    model = Tied()
    start = model.net[0].weight.detach().clone()
    quiet_trainer(max_steps=5, callbacks=[SpredCallback(0.01, verbose=False)]).fit(
        model, classification_data(classes=8)
    )
    assert model.net[3].weight is model.net[0].weight
    assert not torch.equal(model.net[0].weight.detach(), start)


def test_other_stages_are_not_touched():
    class Watch(MLP):
        def validation_step(self, batch, batch_idx):
            self.names = [n for n, _ in self.named_parameters()]

        def test_step(self, batch, batch_idx):
            self.validation_step(batch, batch_idx)

    model = Watch()
    snapshot = plain_snapshot(model)
    trainer = quiet_trainer(callbacks=[SpredCallback(0.1, verbose=False)])
    for run in (trainer.validate, trainer.test):
        run(model, classification_data())
        assert model.names == list(snapshot)
    assert_same_model(model, snapshot)


def test_same_callback_fits_twice():
    model = MLP()
    callback = SpredCallback(0.01, verbose=False)
    quiet_trainer(max_steps=3, callbacks=[callback]).fit(model, classification_data())
    after_first = plain_snapshot(model)
    quiet_trainer(max_steps=3, callbacks=[callback]).fit(model, classification_data())
    assert list(plain_snapshot(model)) == list(after_first)
    assert not torch.equal(model.net[0].weight.detach(), after_first["net.0.weight"])


def test_subclass_can_choose_parameters():
    class OnlyFirst(SpredCallback):
        def select_parameters(self, pl_module):
            return [t for t in super().select_parameters(pl_module) if t.name.startswith("net.0")]

    model, callback = MLP(), OnlyFirst(0.1, verbose=False)
    last = model.net[3].weight.detach().clone()
    quiet_trainer(max_steps=2, callbacks=[callback]).fit(model, classification_data())
    assert [f.name for f in callback.factorizations] == ["net.0.weight"]
    assert not torch.equal(model.net[3].weight, last)  # trained, unpenalised


@pytest.mark.parametrize("lam", [-1.0, math.nan, math.inf, -0.0 - 1e-9])
def test_bad_lam_value(lam):
    with pytest.raises(ValueError, match="`lam` must be a finite number >= 0"):
        SpredCallback(lam)


@pytest.mark.parametrize("lam", ["0.1", True, [0.1]])
def test_bad_lam_type(lam):
    with pytest.raises(TypeError, match="`lam` must be a real number such as 1e-4"):
        SpredCallback(lam)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`threshold` must be a finite number"):
        SpredCallback(0.1, threshold=-1)
    with pytest.raises(TypeError, match="`modules` must hold nn.Module subclasses"):
        SpredCallback(0.1, modules=["Linear"])
    with pytest.raises(ValueError, match="either `select` or `include`"):
        SpredCallback(0.1, include=["*"], select=lambda *a: True)
    with pytest.raises(ValueError, match=r"lam_overrides\['x'\]"):
        SpredCallback(0.1, lam_overrides={"x": -2})
    with pytest.raises(ValueError, match=r"`groups\['net.0.weight'\]` is 'inputs'"):
        SpredCallback(0.1, groups={"net.0.weight": "inputs"})  # at construction: LightningCLI users see it at parse
    with pytest.raises(ValueError, match="Give `lam`"):
        SpredCallback()


def test_numbers_of_any_kind_and_one_module_type_are_accepted():
    for lam in (np.array(1e-4), np.float32(1e-4), np.array([1e-4])):
        assert SpredCallback(lam).lam == pytest.approx(1e-4)
    assert SpredCallback(torch.tensor(1e-4)).lam == pytest.approx(1e-4)
    assert SpredCallback(0.1, modules=nn.Linear).selection.modules == (nn.Linear,)


class NoLinear(LightningModule):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))

    def training_step(self, batch, batch_idx):
        return (batch[0] * self.scale).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_nothing_to_penalise_is_an_error_before_training():
    model = NoLinear()
    snapshot = plain_snapshot(model)
    with pytest.raises(ValueError, match="found nothing to penalise.*include="):
        quiet_trainer(max_steps=1, callbacks=[SpredCallback(0.1)]).fit(model, classification_data())
    assert_same_model(model, snapshot)


def test_parametrised_weight_is_an_error_and_model_untouched():
    model = MLP()
    torch.nn.utils.parametrize.register_parametrization(model.net[3], "weight", nn.Identity())
    snapshot = plain_snapshot(model)
    with pytest.raises(ValueError, match="already parametrised"):
        quiet_trainer(max_steps=1, callbacks=[SpredCallback(0.1)]).fit(model, classification_data())
    assert_same_model(model, snapshot)


def test_a_weight_in_no_optimizer_is_left_as_the_plain_model_leaves_it():
    model = MLP(optimizer=lambda params: torch.optim.SGD([p for p in params if p.ndim == 1], lr=0.1))
    snapshot = plain_snapshot(model)
    with pytest.warns(UserWarning, match="`net.0.weight`, `net.3.weight` are penalised but in no optimizer"):
        quiet_trainer(max_steps=2, callbacks=[SpredCallback(0.1, threshold=0.5)]).fit(model, classification_data())
    for name in ("net.0.weight", "net.3.weight"):  # not trained, so neither penalised nor thresholded
        assert torch.equal(model.get_parameter(name), snapshot[name])


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-3), "effective L1 coefficient is lam \\+ weight_decay"),
        (lambda p: torch.optim.AdamW(p, lr=0.1), "decoupled weight decay"),
    ],
)
def test_weight_decay_on_factors_warns(optimizer, message):
    with pytest.warns(UserWarning, match=message):
        quiet_trainer(max_steps=1, callbacks=[SpredCallback(0.1, verbose=False)]).fit(
            MLP(optimizer=optimizer), classification_data()
        )


def test_lbfgs_is_refused():
    model = MLP(optimizer=lambda p: torch.optim.LBFGS(p))
    with pytest.raises(ValueError, match="LBFGS re-evaluates"):
        quiet_trainer(max_steps=1, callbacks=[SpredCallback(0.1)]).fit(model, classification_data())


class TwoOptimizers(MLP):
    """The first layer and the LayerNorm after it in two different optimizers (manual optimization)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        for optimizer in self.optimizers():
            optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        for optimizer in self.optimizers():
            optimizer.step()

    def configure_optimizers(self):
        first = [p for n, p in self.named_parameters() if n.startswith("net.0.")]
        rest = [p for n, p in self.named_parameters() if not n.startswith("net.0.")]
        return torch.optim.SGD(first, lr=0.1), torch.optim.SGD(rest, lr=0.1)


def test_a_group_split_over_two_optimizers_is_refused_with_its_tensors_named():
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    model = TwoOptimizers()
    model.net = net
    spred = SpredCallback(0.1, groups={"net.0.weight": "channel"}, verbose=False)
    with pytest.raises(
        ValueError, match=r"`net.0.weight` \(net.0.weight, net.0.bias, net.1.weight, net.1.bias\) share"
    ):
        quiet_trainer(max_steps=1, callbacks=[spred]).fit(model, classification_data())


def test_sharded_strategies_are_refused():
    class FakeTrainer:
        strategy = FSDPStrategy.__new__(FSDPStrategy)

    with pytest.raises(ValueError, match="not FSDPStrategy.*strategy='ddp'"):
        check_strategy(FakeTrainer())


class Crash(MLP):
    def __init__(self, error: BaseException, at_step: int = 3):
        super().__init__()
        self.error, self.at_step = error, at_step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.at_step:
            raise self.error
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["exception", "interrupt"])
def test_crash_leaves_a_plain_finite_model(error):
    model = Crash(error)
    names = [n for n, _ in model.named_parameters()]
    start = model.net[0].weight.detach().clone()
    expected = SystemExit if isinstance(error, KeyboardInterrupt) else RuntimeError  # Lightning exits on Ctrl+C
    with pytest.raises(expected):
        quiet_trainer(max_steps=10, callbacks=[SpredCallback(0.01, verbose=False)]).fit(model, classification_data())
    assert [n for n, _ in model.named_parameters()] == names
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.net[0].weight.detach(), start)  # the three steps taken are kept


def test_one_callback_serves_a_cross_validation():
    # every fit starts from a fresh controller: the second fold must not start in the first one's refit
    callback = SpredCallback(groups={"net.0.weight": "input"}, target_groups=3, check_every=2, verbose=False)
    counts, phases = [], []
    for seed in range(2):
        model = MLP(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
        quiet_trainer(max_epochs=20, callbacks=[callback]).fit(model, classification_data(seed=seed))
        counts.append(int((model.net[0].weight.abs().sum(dim=0) > 0).sum()))
        phases.append(callback.steering.reached_step)
    assert counts == [3, 3]
    assert phases[0] == phases[1] == callback.steering.refit_step


def test_bad_targets_and_paths_are_refused_before_training(tmp_path):
    model = MLP()
    snapshot = plain_snapshot(model)
    too_many = SpredCallback(groups={"net.0.weight": "input"}, target_groups=9, verbose=False)
    with pytest.raises(ValueError, match=r"`target_groups=9` is more than the 8 groups"):
        quiet_trainer(max_steps=2, callbacks=[too_many]).fit(model, classification_data())
    assert_same_model(model, snapshot)
    with pytest.raises(ValueError, match="`path_dir` is where the path's snapshots go"):
        SpredCallback(0.1, path_dir=str(tmp_path))
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        quiet_trainer(max_steps=2, callbacks=[SpredCallback(0.1, record_path=1, path_dir=str(file))]).fit(
            model, classification_data()
        )
    assert_same_model(model, snapshot)
    with pytest.raises(ValueError, match="A target steers `lam` itself"):
        SpredCallback(GeometricRamp(0.1, 1.0, steps=3), target_sparsity=0.5)
    with pytest.raises(ValueError, match="cannot keep a group in each of the 2 grouped"):
        two = SpredCallback(groups={"net.0.weight": "input", "net.3.weight": "input"}, target_groups=1)
        quiet_trainer(max_steps=2, callbacks=[two]).fit(model, classification_data())


class ManualMLP(MLP):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


def test_manual_optimization_with_a_target_is_refused_at_fit_start():
    model = ManualMLP()
    snapshot = plain_snapshot(model)
    with pytest.raises(ValueError, match="manual optimization cannot run without stepping: give `lam_max=`"):
        spred = SpredCallback(target_sparsity=0.5, prune_by="path")  # the path scales lam with lam_max
        quiet_trainer(max_steps=2, callbacks=[spred]).fit(model, classification_data())
    assert_same_model(model, snapshot)
    # a starting lam is enough, and a target led by magnitude needs no lam_max
    spred = SpredCallback(1e-3, target_sparsity=0.5, prune_by="path")
    quiet_trainer(max_steps=2, callbacks=[spred]).fit(model, classification_data())
    quiet_trainer(max_steps=2, callbacks=[SpredCallback(target_sparsity=0.5)]).fit(model, classification_data())


def test_an_override_of_compute_metrics_may_drop_any_value(tmp_path):
    class Fewer(SpredCallback):
        def compute_metrics(self, census=None):
            return {"spred/nonzeros": super().compute_metrics(census)["spred/nonzeros"]}

    logger = CSVLogger(tmp_path)
    quiet_trainer(max_steps=4, log_every_n_steps=1, logger=logger, callbacks=[Fewer(0.01, verbose=False)]).fit(
        MLP(), classification_data()
    )
    logged = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "spred/nonzeros" in logged and "spred/sparsity" not in logged


class CountHostTransfers:
    """Counts tensor-to-Python conversions (`item`, `tolist`, `cpu`, `bool`, `int`, `float`) made by the package:
    on a GPU each one waits for the device's queue to empty."""

    METHODS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self):
        self.calls, self.counting = [], False

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.METHODS}
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def __exit__(self, *args):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)

    def _wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if self.counting and "lightning_spred" in caller:
                self.calls.append((name, caller.rsplit("/", 1)[-1], sys._getframe(1).f_lineno))
            return original(tensor, *args, **kwargs)

        return counted


class CountBetweenLogs(Callback):
    """Counts the package's conversions in steps 20 to 59 (after the first-step diagnostics, before anything logs)."""

    def __init__(self, counter):
        self.counter = counter

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counter.counting = 20 <= trainer.global_step < 60


@pytest.mark.parametrize(
    "spred, expected",
    [
        (lambda: SpredCallback(1e-3, verbose=False), 0),
        (lambda: SpredCallback(GeometricRamp(1e-3, 1e-1, steps=40), verbose=False), 0),
        (lambda: SpredCallback(target_sparsity=0.5, check_every=10, verbose=False), 4),  # one per check, 40 steps
        (lambda: SpredCallback(groups={"net.0.weight": "input"}, target_groups=3, verbose=False), 4),
    ],
    ids=["fixed", "ramp", "target_sparsity", "target_groups"],
)
def test_no_device_sync_between_logs_but_one_transfer_per_check(spred, expected):
    callback = spred()
    with CountHostTransfers() as counter:
        trainer = quiet_trainer(max_steps=100, log_every_n_steps=1000, callbacks=[callback, CountBetweenLogs(counter)])
        counter.counting = False
        trainer.fit(MLP(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)), classification_data(n=1024))
    # steps 20..59 (a target's refit starts at 67): only the controller's checks after steps 30, 40, 50 and 60, one
    # transfer each (`cpu` then `tolist` on the host copy)
    transfers = [call for call in counter.calls if call[0] != "tolist"]
    assert len(transfers) == expected, counter.calls
