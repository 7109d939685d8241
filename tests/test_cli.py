"""SpredCallback under LightningCLI: settings from the command line, a bad group kind refused when parsing."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("cli_run.py")


def cli(*arguments: str) -> subprocess.CompletedProcess:
    """``fit`` with a SpredCallback configured by ``arguments``."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(SCRIPT), "fit", "--trainer.callbacks+=lightning_spred.SpredCallback", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_a_bad_group_kind_is_refused_when_the_command_line_is_parsed():
    groups = '--trainer.callbacks.groups={"net.0.weight": "columns"}'
    result = cli("--trainer.callbacks.lam=0.1", groups, "--print_config")
    assert result.returncode != 0
    assert "Literal['input', 'output', 'channel', 'head', 'neuron', 'rank']" in result.stderr
    assert "Given value: columns" in result.stderr
    assert "Traceback" not in result.stderr  # a parser error, not an exception from inside the callback


def test_the_callback_trains_from_the_command_line(tmp_path):
    result = cli(
        "--trainer.max_steps=3",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks.lam=0.1",
        '--trainer.callbacks.groups={"net.0.weight": "input"}',
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "penalty on 1 term (128 weights): net.0.weight" in result.stdout + result.stderr
