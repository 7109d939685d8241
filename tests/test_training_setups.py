"""The penalty stays exact in every common training setup: accumulation, AMP, clipping, manual optimization, compile."""

import copy

import pytest
import torch
from helpers import (
    MLP,
    assert_same_lasso_solution,
    classification_data,
    diabetes,
    one_sgd_step,
    quiet_trainer,
    sklearn_lasso,
    spred_lasso,
)
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_spred import SpredCallback


def plain_sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def test_accumulation_equals_the_large_batch():
    start = MLP(optimizer=plain_sgd)
    large, accumulated = copy.deepcopy(start), copy.deepcopy(start)
    quiet_trainer(max_epochs=2, callbacks=[SpredCallback(0.05, threshold=0.0, verbose=False)]).fit(
        large, classification_data(n=128, batch_size=32)
    )
    quiet_trainer(
        max_epochs=2, accumulate_grad_batches=4, callbacks=[SpredCallback(0.05, threshold=0.0, verbose=False)]
    ).fit(accumulated, classification_data(n=128, batch_size=8))
    assert large.global_step == accumulated.global_step == 8
    for (name, a), b in zip(large.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_reaches_the_lasso_support(precision):
    x, y = diabetes()
    alpha = 0.02
    if precision == "16-mixed":
        settings = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    else:
        settings = {"precision": precision}
    weights = spred_lasso(x, y, alpha, "sgd", lr=0.1, steps=4000, **settings)
    assert_same_lasso_solution(weights, sklearn_lasso(x, y, alpha))


class Overflow(MLP):
    """Returns an infinite loss at one step, so the GradScaler must skip that step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.global_step == 2 else loss


class RecordWeights(Callback):
    def __init__(self, spred):
        self.spred, self.before, self.after = spred, {}, {}

    def _weights(self):
        return [w.detach().clone() for f in self.spred.factorizations for w in f.weights]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = self._weights()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self._weights()


def test_skipped_amp_steps_leave_the_factors_untouched():
    spred = SpredCallback(0.05, verbose=False)
    record = RecordWeights(spred)
    scaler = torch.amp.GradScaler("cpu")
    model = Overflow()
    quiet_trainer(
        max_steps=4, callbacks=[spred, record], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    ).fit(model, classification_data())
    # the step with the infinite loss is skipped: global_step still advances in Lightning, the factors do not
    skipped = [s for s in record.before if all(torch.equal(a, b) for a, b in zip(record.before[s], record.after[s]))]
    moved = [s for s in record.before if s not in skipped]
    assert len(skipped) == 1 and len(moved) == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_clipping_clips_the_loss_gradient_then_adds_the_penalty():
    model = MLP(optimizer=plain_sgd)
    reference = copy.deepcopy(model)
    data = classification_data(n=16, batch_size=16)
    lam, lr, clip = 0.05, 0.1, 0.01
    quiet_trainer(
        max_steps=1, gradient_clip_val=clip, callbacks=[SpredCallback(lam, threshold=0.0, verbose=False)]
    ).fit(model, data)

    x, y = next(iter(data))
    nn.functional.cross_entropy(reference(x), y).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
    for name in ("net.0.weight", "net.3.weight"):
        w = reference.get_parameter(name)
        torch.testing.assert_close(model.get_parameter(name), one_sgd_step(w, w.grad, lam, lr))


class GAN(LightningModule):
    """Two optimizers stepped by hand; the discriminator step uses the freshly updated generator."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.generator, self.discriminator = nn.Linear(4, 4), nn.Linear(4, 1)

    def generator_loss(self, z):
        return -self.discriminator(self.generator(z)).mean()

    def discriminator_loss(self, z, real):
        return self.discriminator(self.generator(z).detach()).mean() - self.discriminator(real).mean()

    def training_step(self, batch, batch_idx):
        z, real = batch
        for optimizer, loss in zip(
            self.optimizers(), (lambda: self.generator_loss(z), lambda: self.discriminator_loss(z, real))
        ):
            self.toggle_optimizer(optimizer)
            optimizer.zero_grad()
            self.manual_backward(loss())
            optimizer.step()
            self.untoggle_optimizer(optimizer)

    def configure_optimizers(self):
        return plain_sgd(self.generator.parameters()), plain_sgd(self.discriminator.parameters())


def test_manual_optimization_with_two_optimizers_matches_explicit_factors():
    torch.manual_seed(0)
    gan = GAN()
    data = TensorDataset(torch.randn(24, 4), torch.randn(24, 4) + 1)
    batches = list(DataLoader(data, batch_size=8))
    lam = 0.05
    start = copy.deepcopy(gan)
    quiet_trainer(max_steps=6, callbacks=[SpredCallback(lam, threshold=0.0, verbose=False)]).fit(
        gan, DataLoader(data, batch_size=8)
    )

    # Independent reference: the factorised objective trained by autograd with explicit factors.
    factors = {}
    for name in ("generator", "discriminator"):
        weight = getattr(start, name).weight.detach()
        scale = weight.abs().mean().sqrt()  # spred's start: u = w / c, v = c
        factors[name] = ((weight / scale).requires_grad_(), torch.full_like(weight, scale).requires_grad_())
        del getattr(start, name).weight
    opts = {n: plain_sgd([*factors[n], getattr(start, n).bias]) for n in factors}

    def load_products():
        for n, (u, v) in factors.items():
            getattr(start, n).weight = u * v

    for z, real in batches:
        for n, loss_fn in (
            ("generator", lambda: start.generator_loss(z)),
            ("discriminator", lambda: start.discriminator_loss(z, real)),
        ):
            load_products()
            u, v = factors[n]
            opts[n].zero_grad()
            (loss_fn() + lam / 2 * (u.pow(2).sum() + v.pow(2).sum())).backward()
            opts[n].step()
    load_products()
    for n in factors:
        torch.testing.assert_close(getattr(gan, n).weight, getattr(start, n).weight.detach(), atol=1e-6, rtol=1e-5)


def test_compiled_model_trains_like_the_eager_one():
    eager = MLP(optimizer=plain_sgd)
    compiled_source = copy.deepcopy(eager)
    quiet_trainer(max_steps=4, callbacks=[SpredCallback(0.05, threshold=0.0, verbose=False)]).fit(
        eager, classification_data()
    )
    compiled = torch.compile(compiled_source)
    quiet_trainer(max_steps=4, callbacks=[SpredCallback(0.05, threshold=0.0, verbose=False)]).fit(
        compiled, classification_data()
    )
    assert [n for n, _ in compiled_source.named_parameters()] == [n for n, _ in eager.named_parameters()]
    for a, b in zip(eager.parameters(), compiled_source.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


class Stream(IterableDataset):
    """A dataset without a length: Lightning cannot tell how many steps `max_epochs` makes."""

    def __iter__(self):
        yield from classification_data(n=64, batch_size=1).dataset


def stream() -> DataLoader:
    return DataLoader(Stream(), batch_size=16)


def test_a_target_without_a_known_budget_is_refused_before_training_and_a_given_one_is_used():
    model = MLP()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(
        ValueError, match=r"length is unknown.*`Trainer\(max_steps=...\)`, or `SpredCallback\(..., total_steps"
    ):
        quiet_trainer(max_epochs=3, callbacks=[SpredCallback(target_sparsity=0.5)]).fit(model, stream())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    spred = SpredCallback(target_sparsity=0.5, total_steps=12, check_every=2, verbose=False)
    quiet_trainer(max_epochs=3, callbacks=[spred]).fit(model, stream())
    zeros = sum(int((w == 0).sum()) for f in spred.factorizations for w in f.weights)
    assert zeros == round(0.5 * sum(w.numel() for f in spred.factorizations for w in f.weights))
    assert spred.steering.refit_step == 8


def test_max_time_alone_needs_no_budget_for_a_fixed_lam():
    # `max_time` without `max_steps` makes the number of steps infinite: a fixed lam does not need it
    trainer = quiet_trainer(max_time={"seconds": 2}, callbacks=[SpredCallback(1e-2, verbose=False)])
    trainer.fit(MLP(), classification_data())
    assert trainer.global_step > 0
    with pytest.raises(ValueError, match="length is unknown"):
        quiet_trainer(max_time={"seconds": 2}, callbacks=[SpredCallback(target_sparsity=0.5)]).fit(
            MLP(), classification_data()
        )
