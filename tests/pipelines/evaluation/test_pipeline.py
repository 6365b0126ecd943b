"""The evaluation pipeline alone: probe metrics (JSON and MLflow form) and the probe figure."""

from __future__ import annotations

import json

from matplotlib.figure import Figure

from eva_pipeline.pipelines.evaluation.nodes import plot_probe

TOP1 = ("probe_top1_pretrained", "probe_top1_random", "probe_top1_teacher")


def test_probe_metrics(workspace):
    workspace.run("evaluation")
    metrics = json.loads(workspace.path("probe_metrics").read_text())

    assert set(TOP1) <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in TOP1)
    assert metrics["probe_chance"] == 0.1  # ten Fashion-MNIST classes
    assert metrics["probe_gain"] == metrics["probe_top1_pretrained"] - metrics["probe_top1_random"]
    assert metrics["probe_top1_teacher"] > metrics["probe_chance"]  # real ImageNet features beat chance
    mlflow_form = workspace.catalog.load("probe_metrics_mlflow")
    assert mlflow_form == {k: {"value": v, "step": 0} for k, v in metrics.items()}


def test_probe_figure(workspace):
    workspace.run("evaluation")
    assert workspace.path("probe_plot").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = plot_probe(json.loads(workspace.path("probe_metrics").read_text()))
    assert isinstance(figure, Figure)
    (ax,) = figure.axes
    bars = [t.get_text() for t in ax.get_yticklabels()]
    assert bars == ["EVA student (pre-trained)", "same ViT, random init", "teacher features (ceiling)"]
