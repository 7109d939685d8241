"""Smoke tests: every example and the benchmark run end to end on a tiny setting and write what they promise."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_lasso_example():
    out = run("examples/lasso.py", "--dataset", "diabetes", "--steps", "1500")
    assert "same support: True" in out and "scikit-learn Lasso" in out


def test_gene_selection_example(tmp_path):
    pytest.importorskip("matplotlib")
    out = run(
        "examples/gene_selection.py", "--dataset", "breast_cancer", "--folds", "2", "--repeats", "1", "--ks", "2", "5",
        "--warmup", "20", "--ramp", "60", "--panel", "3", "--no-lassonet", "--out", str(tmp_path),
    )  # fmt: skip
    assert "Test accuracy of L2 logistic regression" in out and "spred path / single spred fit" in out
    assert "`target_groups=3` on all 569 samples keeps" in out
    assert (tmp_path / "accuracy_vs_genes.png").stat().st_size > 0
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0].startswith("method,seconds_per_fold,k2_mean,k5_mean")
    assert [row.split(",")[0] for row in rows[1:]] == [
        "spred network", "spred linear", "L1 logistic", "ANOVA F-test", "spred single fit"
    ]  # fmt: skip
    assert list((tmp_path / "logs").rglob("metrics.csv"))


def test_gene_selection_example_with_lassonet(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("lassonet")
    out = run(
        "examples/gene_selection.py", "--dataset", "breast_cancer", "--folds", "2", "--repeats", "1", "--ks", "2",
        "--warmup", "20", "--ramp", "60", "--panel", "3", "--logger", "none", "--out", str(tmp_path),
    )  # fmt: skip
    assert "LassoNet / spred path" in out
    assert "LassoNet" in (tmp_path / "results.csv").read_text()


def test_compression_example(tmp_path):
    pytest.importorskip("matplotlib")
    out = run(
        "examples/compression.py", "--epochs", "4", "--seeds", "1", "--fractions", "0.5", "--optimizers", "sgd",
        "--out", str(tmp_path),
    )  # fmt: skip
    methods = ("spred target", "spred, then prune", "torch-pruning magnitude", "network slimming", "naive group L1")
    for method in (*methods, "gradual magnitude"):
        assert method in out
    assert (tmp_path / "channels_removed.png").stat().st_size > 0
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0] == "seed,optimizer,method,fraction,removed,accuracy,macs,latency" and len(rows) == 1 + 1 + 6


def test_step_time_benchmark():
    out = run("benchmarks/step_time.py", "--steps", "3", "--rounds", "1")
    assert "variant / plain" in out and out.count("x [") == 8  # spred, naive L1, prox on two models; 2 full batch
