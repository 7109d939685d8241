"""Checkpoints: plain keys everywhere, exact resume, dense-to-sparse fine-tuning, resume after a crash."""

import copy
from pathlib import Path

import pytest
import torch
from helpers import MLP, Interrupt, classification_data, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_spred import GeometricRamp, SpredCallback

LAM = 0.02


def spred():
    return SpredCallback(LAM, threshold=1e-3, verbose=False)


def fit(model, tmp_path: Path, max_epochs: int, ckpt_path=None, extra=(), name="run"):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / name, filename="{epoch}", save_top_k=-1, save_last=True)
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[spred(), checkpoints, *extra], enable_checkpointing=True)
    trainer.fit(model, classification_data(), ckpt_path=ckpt_path)
    return trainer


def assert_same_weights(a, b, atol):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=name)


def test_resume_in_the_middle_equals_an_uninterrupted_run(tmp_path):
    start = MLP()
    straight, resumed = copy.deepcopy(start), MLP()  # `resumed` starts elsewhere: the checkpoint must set everything
    fit(straight, tmp_path, max_epochs=4)
    fit(copy.deepcopy(start), tmp_path, max_epochs=2, name="half")
    fit(resumed, tmp_path, max_epochs=4, ckpt_path=tmp_path / "half" / "epoch=1.ckpt", name="resumed")
    assert_same_weights(straight, resumed, atol=1e-6)


def test_every_checkpoint_loads_strictly_into_the_plain_model(tmp_path):
    weights_only = ModelCheckpoint(
        dirpath=tmp_path / "weights", save_weights_only=True, every_n_train_steps=2, save_top_k=-1
    )
    fit(MLP(), tmp_path, max_epochs=3, extra=[weights_only])
    paths = sorted((tmp_path / "run").glob("*.ckpt")) + sorted((tmp_path / "weights").glob("*.ckpt"))
    assert len(paths) >= 6
    plain_keys = list(MLP().state_dict())
    for path in paths:
        loaded = MLP.load_from_checkpoint(path)  # strict by default
        assert list(loaded.state_dict()) == plain_keys
        weight = loaded.net[0].weight
        assert ((weight == 0) | (weight.abs() > 1e-3)).all()  # checkpoints already hold the thresholded weights


def test_dense_pretrained_model_fine_tunes_into_a_sparse_one(tmp_path):
    dense = MLP()
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(dense, classification_data())
    assert (dense.net[0].weight != 0).all()
    path = tmp_path / "dense.ckpt"
    trainer.save_checkpoint(path)

    # resuming the dense run continues it with the penalty, from its weights, optimizer and loop state
    resumed = MLP()
    fit(resumed, tmp_path, max_epochs=40, ckpt_path=path, name="resume_dense")
    model = MLP.load_from_checkpoint(path)
    fit(model, tmp_path, max_epochs=40, name="from_weights")
    for sparse in (resumed, model):
        assert (sparse.net[0].weight == 0).float().mean() > 0.3  # 0.59 here


class CrashAt(MLP):
    def __init__(self, step: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.crash_step = step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.crash_step:
            raise RuntimeError("simulated crash")
        return super().training_step(batch, batch_idx)


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    start = MLP()
    straight = copy.deepcopy(start)
    fit(straight, tmp_path, max_epochs=4)
    crashing = CrashAt(step=10)  # 4 steps per epoch: crashes in the third epoch
    crashing.load_state_dict(start.state_dict())
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashing, tmp_path, max_epochs=4, name="crash")
    assert all(torch.isfinite(p).all() for p in crashing.parameters())
    assert [n for n, _ in crashing.named_parameters()] == [n for n, _ in start.named_parameters()]
    resumed = MLP()
    fit(resumed, tmp_path, max_epochs=4, ckpt_path=tmp_path / "crash" / "last.ckpt", name="resumed")
    assert_same_weights(straight, resumed, atol=1e-6)


def test_checkpoints_with_a_recorded_path_load_with_pytorchs_default_loader(tmp_path):
    def fit(model, name, ckpt_path=None, stop=()):
        spred = SpredCallback(GeometricRamp(1e-3, 0.3, steps=30), record_path=1, threshold=1e-3, verbose=False)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
        trainer = quiet_trainer(max_epochs=10, callbacks=[spred, checkpoint, *stop], enable_checkpointing=True)
        trainer.fit(model, classification_data(), ckpt_path=ckpt_path)
        return spred

    start = MLP()
    straight = fit(copy.deepcopy(start), "straight")
    state = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)  # plain tensors, numbers, strings
    assert len(next(v for k, v in state["callbacks"].items() if k.startswith("SpredCallback"))["path"]["points"]) == 40
    MLP.load_from_checkpoint(tmp_path / "straight" / "last.ckpt")  # Lightning's loader, weights_only by default
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(copy.deepcopy(start), "interrupted", stop=[Interrupt(step=20)])
    resumed = fit(MLP(), "resumed", ckpt_path=tmp_path / "interrupted" / "last.ckpt")
    assert [p.step for p in resumed.path] == [p.step for p in straight.path] == list(range(1, 41))
    for a, b in zip(resumed.path, straight.path):
        assert a.nonzeros == b.nonzeros and a.lam == pytest.approx(b.lam)
