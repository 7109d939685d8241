"""Step-time overhead of SpredCallback against plain training, naive L1 and proximal SGD, side by side.

Each variant trains the same model on the same random batches inside a Lightning Trainer on the CPU.
Variants run in interleaved rounds (plain, spred, naive, prox, plain, ...) so that machine noise hits
them alike. A round's figure of a variant is its median step time divided by plain training's in the same
round; the script prints the median of these ratios over the rounds and their range, never a lone time. Beside it,
the whole fit: the wall time of `trainer.fit` (setup, `lam_max`, the first-step diagnostics, every step, teardown),
as a ratio to plain training's in the same round.

    python benchmarks/step_time.py            # MLP 784-1024-1024-10 @128 and a small CNN @32
    python benchmarks/step_time.py --steps 30 --rounds 1   # quick look
    python benchmarks/step_time.py --logger                # every variant logs to a CSVLogger
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spred import GeometricRamp, SpredCallback

LAM = 1e-4
LR = 0.01


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def penalised(net: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


class Classifier(LightningModule):
    """SGD with momentum; ``penalty`` is ``"none"``, ``"naive"`` (lam*sum|w| in the loss) or ``"prox"``."""

    def __init__(self, net: nn.Module, penalty: str = "none") -> None:
        super().__init__()
        self.net, self.penalty = net, penalty

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.penalty == "naive":
            loss = loss + LAM * sum(w.abs().sum() for w in penalised(self.net))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)
        if self.penalty == "prox":
            weights = penalised(self.net)

            @torch.no_grad()
            def soft_threshold(*_: Any) -> None:
                for w in weights:
                    w.copy_(w.sign() * (w.abs() - LR * LAM).clamp_min(0))

            optimizer.register_step_post_hook(soft_threshold)
        return optimizer


class StepTimer(Callback):
    """Time from the start of one training batch to the start of the next: the step and everything after it
    (epoch-end hooks and logging included), as a user waits for it."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        now = time.perf_counter()
        if trainer.global_step > self.warmup:
            self.times.append(now - self._start)
        self._start = now


@dataclass
class Case:
    label: str
    make_net: Callable[[], nn.Module]
    shape: tuple
    batch: int
    batches: int  # per epoch
    classes: int
    spred: dict[str, Callable[[], SpredCallback]]  # variant name -> callback


def genes() -> nn.Module:
    return nn.Sequential(nn.Linear(6830, 32), nn.ReLU(), nn.Linear(32, 14))


def gene_path(steps: int) -> SpredCallback:
    ramp = GeometricRamp(1e-2, 1.0, steps=steps, relative=True)
    return SpredCallback(ramp, groups={"net.0.weight": "input"}, record_path=50, verbose=False, print_report=False)


def fixed() -> SpredCallback:
    return SpredCallback(LAM, verbose=False, print_report=False)


CASES = {
    "mlp": Case("MLP 784-1024-1024-10, batch 128", mlp, (784,), 128, 8, 10, {"spred": fixed}),
    "cnn": Case("small CNN, batch 32", cnn, (1, 28, 28), 32, 8, 10, {"spred": fixed}),
    # one step per epoch, as in gene selection: epoch-end work happens at every step
    "full": Case(
        "full batch 6830-32-14, 43 samples",
        genes,
        (6830,),
        43,
        1,
        14,
        {
            "spred": lambda: SpredCallback(0.05, groups={"net.0.weight": "input"}, verbose=False, print_report=False),
            "spred path": lambda: gene_path(200),
        },
    ),
}


def median_step(case: Case, variant: str, steps: int, logger: bool) -> tuple[float, float]:
    """The median step time and the whole fit's wall time."""
    torch.manual_seed(0)
    x, y = (
        torch.randn(case.batch * case.batches, *case.shape),
        torch.randint(0, case.classes, (case.batch * case.batches,)),
    )
    data = DataLoader(TensorDataset(x, y), batch_size=case.batch, shuffle=False)
    timer = StepTimer(warmup=5)
    callbacks: list[Callback] = [timer] + ([case.spred[variant]()] if variant in case.spred else [])
    penalty = variant if variant in ("naive", "prox") else "none"
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = Trainer(
            accelerator="cpu", max_steps=steps + 6, callbacks=callbacks, logger=CSVLogger(log_dir) if logger else False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=50,
        )  # fmt: skip
        start = time.perf_counter()
        trainer.fit(Classifier(case.make_net(), penalty), data)
        whole = time.perf_counter() - start
    return statistics.median(timer.times), whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per variant")
    parser.add_argument("--logger", action="store_true", help="attach a CSVLogger to every variant")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    logged = "with a CSVLogger" if args.logger else "without a logger"
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.rounds} rounds x {args.steps} steps, {logged}")
    print(f"{'model':36} {'variant':12} {'step / plain':>22} {'whole fit / plain':>22}")
    for case in (CASES[name] for name in args.cases):
        variants = ["none", *case.spred, *(["naive", "prox"] if case.batches > 1 else [])]
        steps: dict[str, list[float]] = {v: [] for v in variants}
        fits: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for variant in variants:
                step, whole = median_step(case, variant, args.steps, args.logger)
                steps[variant].append(step)
                fits[variant].append(whole)
        for variant in variants[1:]:
            name = {"naive": "naive L1", "prox": "prox SGD"}.get(variant, variant)
            step_cell, fit_cell = ratio_cell(steps[variant], steps["none"]), ratio_cell(fits[variant], fits["none"])
            print(f"{case.label:36} {name:12} {step_cell:>22} {fit_cell:>22}")
    print("each cell: median over rounds of (variant / plain in the same round) [lowest - highest round]")


def ratio_cell(variant: list[float], plain: list[float]) -> str:
    """Pair each round with the plain run of the same round, so slow phases of the machine cancel out."""
    ratios = [v / p for v, p in zip(variant, plain)]
    return f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"


if __name__ == "__main__":
    main()
