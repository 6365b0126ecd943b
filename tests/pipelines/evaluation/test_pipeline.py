"""The evaluation pipeline alone: probe metrics (JSON and MLflow form), its baselines and the probe figure."""

from __future__ import annotations

import json

import pytest
import torch
from matplotlib.figure import Figure

from eva_pipeline.models import get_config
from eva_pipeline.models.eva import EvaMIM
from eva_pipeline.pipelines.evaluation import nodes
from eva_pipeline.pipelines.evaluation.nodes import plot_probe
from png_checks import assert_png_of

TOP1 = ("probe_top1_pretrained", "probe_top1_random", "probe_top1_raw_pixels", "probe_top1_teacher")


def test_probe_metrics(workspace):
    workspace.run("evaluation")
    metrics = json.loads(workspace.path("probe_metrics").read_text())

    assert set(TOP1) <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in TOP1)
    assert metrics["probe_chance"] == 0.1  # ten Fashion-MNIST classes
    assert metrics["probe_gain"] == metrics["probe_top1_pretrained"] - metrics["probe_top1_random"]
    gain_over_pixels = metrics["probe_top1_pretrained"] - metrics["probe_top1_raw_pixels"]
    assert metrics["probe_gain_over_raw_pixels"] == gain_over_pixels
    assert metrics["probe_top1_raw_pixels"] > 3 * metrics["probe_chance"]  # pixels are a real baseline, not noise
    assert metrics["probe_top1_teacher"] > metrics["probe_chance"]  # real ImageNet features beat chance
    mlflow_form = workspace.catalog.load("probe_metrics_mlflow")
    assert mlflow_form == {k: {"value": v, "step": 0} for k, v in metrics.items()}


def test_probe_figure(workspace):
    workspace.run("evaluation")
    figure = plot_probe(json.loads(workspace.path("probe_metrics").read_text()))
    assert_png_of(workspace.path("probe_plot"), figure, dpi=120, bbox_inches="tight")  # the catalog's save_args
    assert isinstance(figure, Figure)
    (ax,) = figure.axes
    bars = [t.get_text() for t in ax.get_yticklabels()]
    assert bars == ["EVA student (pre-trained)", "same ViT, random init", "raw pixels", "teacher features (ceiling)"]


def _probe_inputs(workspace, **pretrain_changes):
    workspace.run("evaluation")
    c = workspace.catalog
    evaluation = c.load("params:evaluation").model_copy(update={"include_teacher": False})
    pretrain = c.load("student_config").model_copy(update=pretrain_changes)
    return c.load("manifest"), c.load("eva_student"), evaluation, pretrain, c.load("params:teacher_targets")


@pytest.mark.slow
def test_random_baseline_is_the_student_at_its_training_seed(workspace, monkeypatch):
    """The random-init row is the student's own starting point: seeded by pretrain.seed, whatever else is seeded."""
    seen: list[EvaMIM] = []
    real = nodes._patch_tokens
    monkeypatch.setattr(nodes, "_patch_tokens", lambda model: seen.append(model) or real(model))
    manifest, state, evaluation, pretrain, teacher = _probe_inputs(workspace, seed=7)
    nodes.linear_probe(manifest, state, evaluation, pretrain, teacher)
    pretrained, random_init = seen
    target_dim = state["lm_head.weight"].shape[0]
    config = get_config(pretrain.model.name, **{**pretrain.model.overrides, "target_dim": target_dim})
    for seed, same in ((7, True), (0, False)):
        torch.manual_seed(seed)
        expected = EvaMIM(config).state_dict()
        got = random_init.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items()) is same, seed
    assert not torch.equal(pretrained.pos_embed, random_init.pos_embed)


@pytest.mark.slow
def test_readout_and_standardisation_reach_the_probe(workspace, monkeypatch):
    """``evaluation.probe.readout`` decides the feature width every encoder hands the probe."""
    widths: dict[str, list[int]] = {"concat": [], "mean": []}
    real = nodes.linear_probe_top1
    manifest, state, evaluation, pretrain, teacher = _probe_inputs(workspace)
    for readout in widths:
        probe = evaluation.probe.model_copy(update={"readout": readout})
        monkeypatch.setattr(
            nodes, "linear_probe_top1", lambda tx, *a, _w=widths[readout]: _w.append(tx.shape[1]) or real(tx, *a)
        )
        nodes.linear_probe(manifest, state, evaluation.model_copy(update={"probe": probe}), pretrain, teacher)
    config = get_config(pretrain.model.name, **pretrain.model.overrides)
    pixels = 28 * 28  # the stored grayscale Fashion-MNIST pixels, once each (the model input has 3 copies)
    assert widths["concat"] == [config.num_patches * config.embed_dim] * 2 + [pixels]
    assert widths["mean"] == [config.embed_dim] * 2 + [pixels]  # flat pixels have no tokens to pool
