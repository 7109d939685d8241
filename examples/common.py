"""Pieces the examples share: a classifier LightningModule, the weights they count, a quiet Trainer, plots."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from torch import nn


def layer_weights(net: nn.Module) -> list[torch.Tensor]:
    """The weights of the Linear and Conv2d layers: what naive L1 penalises and the sparsity figures count."""
    return [m.weight for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


class Classifier(LightningModule):
    """Cross-entropy on any network, with Adam or SGD with momentum.

    ``steps`` (if given) decays the learning rate to zero along a cosine over that many steps: Adam's steps
    keep a size of about ``lr`` however small the gradient, so switched-off weights only settle at zero
    as the learning rate goes to zero. ``naive_l1`` adds ``lam * sum|w|`` of the Linear/Conv weights to the loss.
    ``weight_decay`` maps parameter names to their own (coupled, L2) weight decay; the others get none.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 1e-3,
        steps: Optional[int] = None,
        naive_l1: float = 0.0,
        optimizer: str = "adam",
        weight_decay: Optional[dict[str, float]] = None,
    ) -> None:
        super().__init__()
        self.net, self.lr, self.steps, self.naive_l1 = net, lr, steps, naive_l1
        self.optimizer, self.weight_decay = optimizer, dict(weight_decay or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        if self.naive_l1:
            loss = loss + self.naive_l1 * sum(w.abs().sum() for w in layer_weights(self.net))
        return loss

    def configure_optimizers(self) -> Any:
        named = list(self.named_parameters())
        groups = [{"params": [p for n, p in named if n not in self.weight_decay]}]
        groups += [{"params": [p], "weight_decay": self.weight_decay[n]} for n, p in named if n in self.weight_decay]
        if self.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=0.9)
        else:
            optimizer = torch.optim.Adam(groups, lr=self.lr)
        if self.steps is None:
            return optimizer
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


def quiet_trainer(callbacks: Sequence[Callback] = (), logger: Optional[Logger] = None, **kwargs: Any) -> Trainer:
    """A CPU Trainer without checkpoints, summaries or Lightning's chatter; our scripts print their own progress."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    settings: dict[str, Any] = dict(
        accelerator="cpu", logger=logger or False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False,
    )  # fmt: skip
    return Trainer(callbacks=list(callbacks), **{**settings, **kwargs})


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (examples run on machines without a screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label(axes: Any, xlabel: str, ylabel: str, title: str) -> None:
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend()


def save(figure: Any, path: Any) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
