"""A LightningCLI script over the test MLP, run by tests/test_cli.py in a subprocess."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from helpers import MLP, classification_data  # noqa: E402
from lightning.pytorch import LightningDataModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402


class Data(LightningDataModule):
    def train_dataloader(self):
        return classification_data()


if __name__ == "__main__":
    LightningCLI(MLP, Data)
