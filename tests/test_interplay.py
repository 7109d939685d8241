"""With the rest of Lightning: weight averaging, fine-tuning, late layers, parameter groups, checkpoints after fit.

Each test checks that a project behaves as it did without the callback, plus the penalty: against the weights
recorded step by step, an uninterrupted run, or the plain model.
"""

import copy
import pickle

import pytest
import torch
import yaml
from helpers import MLP, classification_data, one_sgd_step, quiet_trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    EMAWeightAveraging,
    ModelCheckpoint,
    StochasticWeightAveraging,
    WeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.model_summary import summarize
from torch import nn

from lightning_spred import SpredCallback

PENALISED = ("net.0.weight", "net.3.weight")


def sgd(params, lr=0.1):
    return torch.optim.SGD(params, lr=lr)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Record(Callback):
    """The weights the model computed with, after every optimizer step and at every epoch start."""

    def __init__(self):
        self.after_step, self.epoch_start = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append(weights(pl_module))

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start.append(weights(pl_module))


def ema(records, decay):
    average = dict(records[0])
    for record in records[1:]:
        average = {n: decay * average[n] + (1 - decay) * record[n] for n in average}
    return average


def mean(records):
    return {n: sum(r[n] for r in records) / len(records) for n in records[0]}


def assert_weights(model, expected, atol):
    for name, value in model.named_parameters():
        torch.testing.assert_close(value.detach(), expected[name], atol=atol, rtol=0, msg=name)


AVERAGING = {
    # name: (make the callback, what it averages, the expected average)
    "ema": (lambda: EMAWeightAveraging(decay=0.9), lambda r: ema(r.after_step, 0.9)),
    "equal": (lambda: WeightAveraging(), lambda r: mean(r.after_step)),
    # SWA averages the weights at the start of every epoch from its (zero-based) start `swa_epoch_start - 1` on
    "swa": (
        lambda: StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=1),
        lambda r: mean(r.epoch_start[1:]),
    ),
}


@pytest.mark.parametrize("order", ["spred_first", "averaging_first"])
@pytest.mark.parametrize("averaging", list(AVERAGING))
def test_weight_averaging_averages_the_weights_the_model_computed_with(averaging, order, tmp_path):
    make, expected_average = AVERAGING[averaging]
    spred, averager, record = SpredCallback(0.05, verbose=False, print_report=False), make(), Record()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    callbacks = [spred, averager] if order == "spred_first" else [averager, spred]
    model = MLP(optimizer=sgd)
    trainer = quiet_trainer(max_epochs=4, callbacks=[*callbacks, record, checkpoint], enable_checkpointing=True)
    trainer.fit(model, classification_data())

    expected = expected_average(record)
    assert_weights(model, expected, atol=1e-6)  # thresholding at 1e-6 moves nothing further
    for name in PENALISED:
        weight = model.get_parameter(name)
        assert ((weight == 0) | (weight.abs() > 1e-6)).all()  # the averaged model's zeros are exact
    if averaging != "swa":  # WeightAveraging documents the checkpoint's state_dict as the averaged model
        saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
        for name, value in expected.items():
            torch.testing.assert_close(saved[name], value, atol=1e-6, rtol=0, msg=name)


def test_resuming_with_ema_equals_an_uninterrupted_run(tmp_path):
    def fit(model, epochs, ckpt_path=None, name="run"):
        checkpoint = ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
        spred = SpredCallback(0.05, verbose=False, print_report=False)
        callbacks = [spred, EMAWeightAveraging(decay=0.9), checkpoint]
        trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=True)
        trainer.fit(model, classification_data(), ckpt_path=ckpt_path)

    start = MLP()
    straight = copy.deepcopy(start)
    fit(straight, 4)
    fit(copy.deepcopy(start), 2, name="half")
    resumed = MLP()
    fit(resumed, 4, ckpt_path=tmp_path / "half" / "last.ckpt", name="resumed")
    assert_weights(resumed, weights(straight), atol=1e-6)


class FreezeAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            BaseFinetuning.freeze(pl_module.net[0])
            self.frozen = pl_module.net[0].weight.detach().clone()


def test_a_weight_frozen_during_fit_stays_unchanged():
    model, freeze = MLP(), FreezeAt(step=3)
    quiet_trainer(max_epochs=3, callbacks=[SpredCallback(0.05, verbose=False), freeze]).fit(
        model, classification_data()
    )
    assert torch.equal(model.net[0].weight.detach(), freeze.frozen)  # no decay, no step, no threshold


class UnfreezeFirstLayer(BaseFinetuning):
    """The usual transfer-learning pattern: the first layer frozen before training, added to the optimizer later."""

    def __init__(self, epoch, lr):
        super().__init__()
        self.epoch, self.lr = epoch, lr

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == self.epoch:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, lr=self.lr)


class WatchFirstLayer(Callback):
    def __init__(self):
        self.before, self.after, self.grads = {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = pl_module.net[0].weight.detach().clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grad = pl_module.net[0].weight.grad
        self.grads[trainer.global_step] = None if grad is None else grad.clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = pl_module.net[0].weight.detach().clone()


@pytest.mark.parametrize("order", ["spred_first", "finetuning_first"])
def test_a_layer_unfrozen_by_a_finetuning_callback_is_penalised_from_its_first_step(order):
    def trainable_only(params):
        return sgd([p for p in params if p.requires_grad])

    model, lam, lr = MLP(optimizer=trainable_only), 0.05, 0.3
    start = model.net[0].weight.detach().clone()
    spred, finetuning, watch = SpredCallback(lam, verbose=False), UnfreezeFirstLayer(epoch=2, lr=lr), WatchFirstLayer()
    callbacks = [spred, finetuning] if order == "spred_first" else [finetuning, spred]
    quiet_trainer(max_epochs=3, callbacks=[*callbacks, watch]).fit(model, classification_data())

    first_trained = 2 * 4  # 4 steps per epoch
    for step in range(first_trained):
        assert torch.equal(watch.after[step], start)  # frozen: unchanged
    expected = one_sgd_step(watch.before[first_trained], watch.grads[first_trained], lam, lr)
    torch.testing.assert_close(watch.after[first_trained], expected)  # spred's step, at the group's lr
    assert "net.0.weight" in [f.name for f in spred.factorizations]


class BuiltLate(MLP):
    """Creates its layers in `configure_model`, as recommended for large models."""

    def __init__(self):
        super().__init__()
        del self.net

    def configure_model(self):
        if not hasattr(self, "net"):
            self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))


def test_layers_created_in_configure_model_are_penalised():
    model, spred = BuiltLate(), SpredCallback(0.05, threshold=1e-3, verbose=False)
    quiet_trainer(max_epochs=30, callbacks=[spred]).fit(model, classification_data())
    assert [f.name for f in spred.factorizations] == list(PENALISED)
    assert (model.net[0].weight == 0).any()


def test_parameter_groups_by_name_train_the_factors_at_their_weight_s_settings():
    def by_name(model):
        named = list(model.named_parameters())
        return torch.optim.SGD(
            [
                {"params": [p for n, p in named if n.endswith(".weight")], "lr": 0.2},
                {"params": [p for n, p in named if not n.endswith(".weight")], "lr": 0.002},
            ]
        )

    class Grouped(MLP):
        def configure_optimizers(self):
            return by_name(self)

    model, lam = Grouped(), 0.05
    reference = copy.deepcopy(model)
    data = classification_data(n=16, batch_size=16)
    quiet_trainer(max_steps=1, callbacks=[SpredCallback(lam, threshold=0.0, verbose=False)]).fit(model, data)
    x, y = next(iter(data))
    nn.functional.cross_entropy(reference(x), y).backward()
    for name in PENALISED:
        w = reference.get_parameter(name)
        torch.testing.assert_close(model.get_parameter(name), one_sgd_step(w, w.grad, lam, lr=0.2))


def test_an_exclude_pattern_that_matches_nothing_is_an_error_before_training():
    model = MLP()
    before = weights(model)
    with pytest.raises(ValueError, match=r"\['net.O.weight'\] match no parameter"):
        quiet_trainer(max_steps=1, callbacks=[SpredCallback(0.1, exclude=["net.O.weight"])]).fit(
            model, classification_data()
        )
    assert_weights(model, before, atol=0)


def test_excluding_everything_says_so():
    with pytest.raises(ValueError, match=r"nothing to penalise.*outside `exclude=\['\*'\]`"):
        quiet_trainer(max_steps=1, callbacks=[SpredCallback(0.1, exclude=["*"])]).fit(MLP(), classification_data())


def test_a_checkpoint_saved_after_fit_resumes_exactly(tmp_path):
    start = MLP()
    straight, first = copy.deepcopy(start), copy.deepcopy(start)
    quiet_trainer(max_epochs=4, callbacks=[SpredCallback(0.05, verbose=False)]).fit(straight, classification_data())
    trainer = quiet_trainer(max_epochs=2, callbacks=[SpredCallback(0.05, verbose=False)])
    trainer.fit(first, classification_data())
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")
    resumed = MLP()
    quiet_trainer(max_epochs=4, callbacks=[SpredCallback(0.05, verbose=False)]).fit(
        resumed, classification_data(), ckpt_path=tmp_path / "after_fit.ckpt"
    )
    assert_weights(resumed, weights(straight), atol=1e-6)


class CrashAt(MLP):
    """Crashes at the first batch of the third epoch: from there, plain Lightning resumes exactly (in the middle of
    an epoch it cannot, with or without the callback, as a plain DataLoader does not resume mid-epoch)."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 8 and not getattr(self, "crashed", False):
            self.crashed = True
            raise RuntimeError("simulated crash")
        return super().training_step(batch, batch_idx)


def test_a_checkpoint_saved_on_exception_resumes_exactly(tmp_path):
    start = MLP()
    straight = copy.deepcopy(start)
    quiet_trainer(max_epochs=4, callbacks=[SpredCallback(0.05, verbose=False)]).fit(straight, classification_data())
    crashing = CrashAt()
    crashing.load_state_dict(start.state_dict())
    on_exception = ModelCheckpoint(dirpath=tmp_path, save_on_exception=True, save_top_k=0, filename="crash")
    trainer = quiet_trainer(
        max_epochs=4, callbacks=[SpredCallback(0.05, verbose=False), on_exception], enable_checkpointing=True
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(crashing, classification_data())
    (path,) = tmp_path.glob("*.ckpt")
    resumed = MLP()
    quiet_trainer(max_epochs=4, callbacks=[SpredCallback(0.05, verbose=False)]).fit(
        resumed, classification_data(), ckpt_path=path
    )
    assert_weights(resumed, weights(straight), atol=1e-6)


def test_the_monitored_validation_score_is_the_score_of_the_kept_weights(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    spred = SpredCallback(0.05, threshold=2e-2, verbose=False)
    trainer = quiet_trainer(max_epochs=5, callbacks=[spred, checkpoint], enable_checkpointing=True)
    val = classification_data(n=32, seed=1)
    trainer.fit(MLP(), classification_data(), val)
    best = MLP.load_from_checkpoint(checkpoint.best_model_path)
    losses = [nn.functional.cross_entropy(best(x), y, reduction="sum") for x, y in val]
    assert checkpoint.best_model_score.item() == pytest.approx(float(sum(losses)) / 32, abs=1e-6)
    assert (best.net[0].weight == 0).any()


class MidFit(Callback):
    def __init__(self, spred):
        self.spred = spred

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            self.summary = summarize(pl_module)
            self.copies = [copy.deepcopy(pl_module), pickle.loads(pickle.dumps(pl_module))]
            self.callback_copies = [copy.deepcopy(self.spred), pickle.loads(pickle.dumps(self.spred))]


def test_model_summary_pickling_and_copies_during_fit_see_the_plain_model():
    model = MLP(optimizer=sgd)
    plain_count = sum(p.numel() for p in model.parameters())
    spred = SpredCallback(0.05, verbose=False)
    mid = MidFit(spred)
    quiet_trainer(max_steps=5, callbacks=[spred, mid]).fit(model, classification_data())
    assert mid.summary.total_parameters == mid.summary.trainable_parameters == plain_count
    for duplicate in mid.copies:
        assert [n for n, _ in duplicate.named_parameters()] == [n for n, _ in model.named_parameters()]
        assert duplicate.state_dict()["net.0.weight"] is not model.net[0].weight
    assert all(len(c.factorizations) == 2 for c in mid.callback_copies)


def test_settings_are_in_the_loggers_hyperparameters(tmp_path):
    spred = SpredCallback(0.05, threshold=1e-4, groups={"net.0.weight": "input"}, verbose=False)
    trainer = quiet_trainer(max_steps=2, callbacks=[spred], logger=CSVLogger(tmp_path))
    trainer.fit(MLP(), classification_data())
    hparams = yaml.safe_load(open(trainer.logger.log_dir + "/hparams.yaml"))
    assert hparams["spred/lam"] == 0.05 and hparams["spred/threshold"] == 1e-4
    assert hparams["spred/groups"] == {"net.0.weight": "input"} and hparams["spred/penalised"] == ["net.0.weight"]
    assert hparams["features"] == 8  # the model's own hyperparameters are still there


def test_two_callbacks_on_different_weights_work_and_overlap_is_refused():
    first = SpredCallback(0.05, include=["net.0.weight"], modules=(), verbose=False)
    second = SpredCallback(0.01, include=["net.3.weight"], modules=(), verbose=False)
    assert first.state_key != second.state_key
    quiet_trainer(max_steps=2, callbacks=[first, second]).fit(MLP(), classification_data())
    assert [f.name for f in first.factorizations] == ["net.0.weight"]
    assert [f.name for f in second.factorizations] == ["net.3.weight"]
    overlapping = [SpredCallback(0.05, verbose=False), SpredCallback(0.01, include=["net.3.weight"], verbose=False)]
    with pytest.raises(ValueError, match=r"Two SpredCallbacks penalise \['net.0.weight', 'net.3.weight'\]"):
        quiet_trainer(max_steps=2, callbacks=overlapping).fit(MLP(), classification_data())


def test_resuming_with_other_weights_or_without_the_callback(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(
        max_epochs=2, callbacks=[SpredCallback(0.05, verbose=False), checkpoint], enable_checkpointing=True
    ).fit(MLP(), classification_data())
    path = tmp_path / "last.ckpt"
    with pytest.warns(UserWarning, match=r"no longer penalised \['net.3.weight'\], newly penalised none"):
        quiet_trainer(max_epochs=3, callbacks=[SpredCallback(0.05, exclude=["net.3.weight"], verbose=False)]).fit(
            MLP(), classification_data(), ckpt_path=path
        )
    plain = MLP()
    quiet_trainer(max_epochs=3).fit(plain, classification_data(), ckpt_path=path)  # a dense continuation
    assert plain.current_epoch == 3


def test_verbose_and_print_report_are_separate(caplog):
    import logging

    with caplog.at_level(logging.INFO):
        quiet_trainer(max_steps=1, callbacks=[SpredCallback(0.05, verbose=False)]).fit(MLP(), classification_data())
    messages = [r.getMessage() for r in caplog.records]
    assert not any("penalty on" in m for m in messages) and any("sparsity of the penalised" in m for m in messages)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        quiet_trainer(max_steps=1, callbacks=[SpredCallback(0.05, print_report=False)]).fit(
            MLP(), classification_data()
        )
    messages = [r.getMessage() for r in caplog.records]
    assert any("penalty on" in m for m in messages) and not any("sparsity of the penalised" in m for m in messages)
