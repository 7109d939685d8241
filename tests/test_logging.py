"""Sparsity you can watch: logged metrics, the torchmetrics metric, W&B views and the final report."""

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import wandb
from helpers import MLP, classification_data, quiet_trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn
from wandb_records import history_and_summary

from lightning_spred import GeometricRamp, SpredCallback
from lightning_spred.metrics import Sparsity

LAYERS = ("net.0.weight", "net.3.weight")


def fit_logged(tmp_path, loggers, epochs=20, verbose=False):
    callback = SpredCallback(0.05, threshold=1e-3, verbose=verbose)
    model = MLP()
    trainer = quiet_trainer(max_epochs=epochs, log_every_n_steps=2, callbacks=[callback], logger=loggers)
    trainer.fit(model, classification_data())
    return model, callback, trainer


def direct_count(model):
    weights = [model.get_parameter(name) for name in LAYERS]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


def test_csv_logger_gets_every_metric_per_layer(tmp_path):
    model, _callback, trainer = fit_logged(tmp_path, CSVLogger(tmp_path))
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    expected = {"spred/sparsity", "spred/nonzeros", "spred/penalty", *(f"spred/sparsity/{name}" for name in LAYERS)}
    assert expected <= columns
    sparsities = [float(r[c]) for r in rows for c in columns if c.startswith("spred/sparsity") and r[c]]
    assert sparsities and all(0.0 <= s <= 1.0 for s in sparsities)
    step_rows = [r for r in rows if r["spred/sparsity"]]
    assert len(step_rows) == 20 * 4 // 2  # every log_every_n_steps=2 of 80 steps (epoch ends fall on them)
    detail_rows = [r for r in rows if r["spred/nonzeros"]]  # the other values go to the loggers directly
    assert [r["step"] for r in detail_rows] == [r["step"] for r in step_rows]
    # the last values logged are those of the model that leaves fit
    zeros, total = direct_count(model)
    assert float(step_rows[-1]["spred/sparsity"]) == pytest.approx(zeros / total)
    assert 0 < zeros < total
    assert float(detail_rows[-1]["spred/nonzeros"]) == total - zeros
    penalty = 0.05 * sum(model.get_parameter(name).abs().sum().item() for name in LAYERS)
    assert float(detail_rows[-1]["spred/penalty"]) == pytest.approx(penalty, rel=1e-3)
    assert "spred/sparsity" in trainer.progress_bar_metrics


def test_report_equals_a_direct_count_and_is_printed_once(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        model, callback, _ = fit_logged(tmp_path, False, verbose=True)
    report = callback.report()
    assert [layer.name for layer in report.layers] == list(LAYERS)
    for layer in report.layers:
        weight = model.get_parameter(layer.name)
        assert layer.parameters == weight.numel()
        assert layer.nonzeros == int((weight != 0).sum())
        assert layer.compression == pytest.approx(weight.numel() / layer.nonzeros)
    zeros, total = direct_count(model)
    assert report.total.sparsity == pytest.approx(zeros / total)
    printed = [r.getMessage() for r in caplog.records if "sparsity of the penalised weights" in r.getMessage()]
    assert len(printed) == 1 and "total" in printed[0]


def test_report_before_any_fit_is_an_error():
    with pytest.raises(RuntimeError, match="call `trainer.fit` first"):
        SpredCallback(0.1).report()


def test_sparsity_metric_agrees_with_a_direct_count():
    torch.manual_seed(0)
    tensors = [torch.randn(5, 7).masked_fill(torch.rand(5, 7) < 0.4, 0.0), torch.zeros(3), torch.randn(4)]
    metric = Sparsity()
    for tensor in tensors:
        metric.update(tensor)
    flat = torch.cat([t.flatten() for t in tensors])
    assert metric.compute().item() == pytest.approx((flat == 0).float().mean().item())
    layer = nn.Linear(3, 3)
    metric.reset()
    metric.update(layer)
    assert metric.compute().item() == 0.0
    with pytest.raises(ValueError, match="`threshold` must be a number >= 0"):
        Sparsity(threshold=-1)


def offline_wandb_run(tmp_path, monkeypatch, fit):
    """Fit with an offline WandbLogger; return the run's history, summary and directory once written to disk."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lightning-spred-tests")
    fit(logger)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    # `finish` can return before wandb's service has written the last records of an offline run;
    # stopping the service waits for it to close the file.
    wandb.teardown()
    return (*history_and_summary(run_dir), run_dir)


def test_wandb_offline_run_holds_the_views_and_summary(tmp_path, monkeypatch):
    fitted = {}

    def fit(logger):
        fitted["model"], fitted["callback"], _ = fit_logged(tmp_path, logger, epochs=5)

    history, summary, _ = offline_wandb_run(tmp_path, monkeypatch, fit)
    model, callback = fitted["model"], fitted["callback"]

    keys = set().union(*history)
    assert "spred/sparsity" in keys and all(f"spred/sparsity/{n}" in keys for n in LAYERS)
    tables = [row for row in history if any(k.startswith("spred/layer_sparsity_table") for k in row)]
    assert len(tables) == 1  # the bar chart's table, logged once at the end (each table is a W&B artifact)
    for name in LAYERS:
        assert f"spred/log10_abs_weight/{name}/_type" in keys
    histogram_rows = [row for row in history if f"spred/log10_abs_weight/{LAYERS[0]}/values" in row]
    assert len(histogram_rows) == 5  # one per epoch
    assert sum(histogram_rows[-1][f"spred/log10_abs_weight/{LAYERS[0]}/values"]) == int(
        (model.get_parameter(LAYERS[0]) != 0).sum()
    )

    report = callback.report()
    assert summary["spred/final/sparsity"] == pytest.approx(report.total.sparsity)
    assert summary["spred/final/nonzeros"] == report.total.nonzeros
    assert summary["spred/final/compression"] == pytest.approx(report.total.compression) or math.isinf(
        report.total.compression
    )
    assert summary[f"spred/final/sparsity/{LAYERS[1]}"] == pytest.approx(report.layers[1].sparsity)


def test_wandb_gets_the_path_as_a_table_and_a_metric_against_features_plot(tmp_path, monkeypatch):
    # the head's inputs (the hidden units): no normalisation after it to absorb the penalty
    callback = SpredCallback(
        GeometricRamp(0.01, 10.0, steps=50, relative=True), groups={"net.3.weight": "input"}, record_path=True
    )
    data = classification_data()
    model = MLP(optimizer=lambda params: torch.optim.SGD(params, lr=0.1))  # SGD's stable limit: lam <= 5

    def fit(logger):
        quiet_trainer(max_epochs=15, callbacks=[callback], logger=logger).fit(model, data, data)

    history, _, run_dir = offline_wandb_run(tmp_path, monkeypatch, fit)
    (row,) = [row for row in history if "spred/path_table/path" in row]  # logged once, at the end
    assert row["spred/path_table/nrows"] == len(callback.path) == 15  # a point per validation
    written = json.loads((run_dir / "files" / row["spred/path_table/path"]).read_text())
    columns = written["columns"]
    expected = [{**p.as_dict(), "groups": p.groups["net.3.weight"]} for p in callback.path]
    assert [dict(zip(columns, values)) for values in written["data"]] == [
        {c: pytest.approx(e.get(c)) for c in columns}
        for e in expected  # a metric not yet logged is empty
    ]
    groups = [e["groups"] for e in expected]
    assert groups[0] == 16 and groups[-1] < 16  # the path goes from dense to sparse
    plots = {k for k in row if k.startswith("spred/path_plot/") and k.endswith("/_type")}
    assert plots == {"spred/path_plot/val_loss_vs_groups_table/_type"}  # the user's metric, not spred's own


def test_path_points_are_logged_at_the_step_of_the_metrics_they_carry(tmp_path):
    logger = CSVLogger(tmp_path)
    spred = SpredCallback(GeometricRamp(1e-3, 0.3, steps=30), record_path=2, threshold=1e-3, verbose=False)
    quiet_trainer(max_epochs=10, log_every_n_steps=1, logger=logger, callbacks=[spred]).fit(
        MLP(), classification_data()
    )
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    path_steps = [int(r["step"]) for r in rows if r["spred/path/lam"]]
    sparsity_steps = {int(r["step"]) for r in rows if r["spred/sparsity"]}
    # a point recorded after optimizer step g carries that step's metrics, which Lightning logs as step g - 1
    assert path_steps == [p.step - 1 for p in spred.path]
    assert set(path_steps) <= sparsity_steps
