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
        "examples/gene_selection.py", "--dataset", "breast_cancer", "--folds", "2", "--lams", "0.02", "0.2",
        "--steps", "60", "--no-lassonet", "--out", str(tmp_path),
    )  # fmt: skip
    assert "Cross-validated test accuracy" in out and "selects" in out
    assert (tmp_path / "accuracy_vs_genes.png").stat().st_size > 0
    assert (tmp_path / "results.csv").read_text().startswith("lam,genes,spred")
    assert list((tmp_path / "logs").rglob("metrics.csv"))


def test_gene_selection_example_with_lassonet(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("lassonet")
    out = run(
        "examples/gene_selection.py", "--dataset", "breast_cancer", "--folds", "2", "--lams", "0.2",
        "--steps", "60", "--logger", "none", "--out", str(tmp_path),
    )  # fmt: skip
    assert "lassonet acc" in out
    assert "lassonet" in (tmp_path / "results.csv").read_text().splitlines()[0]


def test_compression_example(tmp_path):
    pytest.importorskip("matplotlib")
    out = run("examples/compression.py", "--epochs", "2", "--lams", "1e-3", "--models", "mlp", "--out", str(tmp_path))
    assert "magnitude pruning" in out and "naive L1" in out
    assert (tmp_path / "accuracy_vs_sparsity.png").stat().st_size > 0


def test_step_time_benchmark():
    out = run("benchmarks/step_time.py", "--steps", "3", "--rounds", "1")
    assert "variant / plain" in out and out.count("x [") == 8  # spred, naive L1, prox on two models; 2 full batch
