"""Train the test MLP with SpredCallback on one process or under DDP and save what every rank ends with.

Run by tests/test_ddp.py in a subprocess, because `strategy="ddp"` re-launches this script for rank 1.
Each rank starts from a different initialisation (seeded by its rank) so the run also checks that the
factors are synchronised from rank 0.
"""

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, os.path.dirname(__file__))
from helpers import MLP, classification_data  # noqa: E402

from lightning_spred import SpredCallback  # noqa: E402
from lightning_spred.metrics import Sparsity  # noqa: E402


def rank_tensor(rank: int) -> torch.Tensor:
    """A different tensor on every rank: 10 * (rank + 1) entries, every (rank + 2)-th one zero."""
    return (torch.arange(10 * (rank + 1)) % (rank + 2) != 0).float()


class SaveRankResult(Callback):
    """After SpredCallback has merged (teardown runs in callback order), save this rank's plain weights."""

    def __init__(self, out: Path) -> None:
        self.out, self.not_reduced = out, []

    def on_train_start(self, trainer, pl_module):
        # what DDP leaves out of its gradient all-reduce
        self.not_reduced = sorted(getattr(trainer.strategy.model, "parameters_to_ignore", []))

    def on_train_end(self, trainer, pl_module):
        metric = Sparsity()
        metric.update(rank_tensor(trainer.global_rank))
        self.metric_sparsity = float(metric.compute())  # synchronised over the ranks

    def teardown(self, trainer, pl_module, stage):
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        names = [n for n, _ in pl_module.named_parameters()]
        result = {"state": state, "metrics": metrics, "names": names, "not_reduced": self.not_reduced}
        result["metric_sparsity"] = self.metric_sparsity
        torch.save(result, self.out / f"rank{trainer.global_rank}.pt")


def sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


class InterleavedData(LightningDataModule):
    """Rank r takes samples r, r + world, ...: global batch k is samples 16k..16k+15 on any number of ranks."""

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        dataset = classification_data(n=64).dataset
        return DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=16 // world)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["single", "ddp", "ddp_spawn", "ddp_bucket_view"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    torch.manual_seed(int(os.environ.get("LOCAL_RANK", 0)))
    model = MLP(optimizer=sgd_momentum)
    distributed = args.strategy != "single"
    # DDP can hand out its all-reduce buckets as the gradients; SpredCallback turns w.grad into grad_u in place.
    strategy = DDPStrategy(gradient_as_bucket_view=True) if args.strategy == "ddp_bucket_view" else args.strategy
    # the head's inputs as groups: `selected_features` must come back to this process under ddp_spawn too
    spred = SpredCallback(
        0.1, threshold=1e-3, modules=torch.nn.Linear, groups={"net.3.weight": "input"}, record_path=4, verbose=False
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2 if distributed else 1,
        strategy=strategy if distributed else "auto",
        max_epochs=4,
        callbacks=[spred, SaveRankResult(args.out)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=InterleavedData())
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # the launching process, whatever the strategy
        results = {
            "report": str(spred.report()),
            "path": [(p.step, p.nonzeros) for p in spred.path],
            "features": spred.selected_features().sorted_indices,
        }
        torch.save(results, args.out / "main.pt")


if __name__ == "__main__":
    main()
