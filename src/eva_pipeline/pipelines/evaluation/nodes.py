"""Thin nodes over ``eva_pipeline.evaluation``."""

from __future__ import annotations

import pandas as pd
import torch
from matplotlib.figure import Figure

from eva_pipeline.config import EvaluationParams, PretrainParams, TeacherTargetsParams
from eva_pipeline.evaluation import ProbeConfig, extract_features, linear_probe_top1, probe_bar_chart, split_probe
from eva_pipeline.loader.pixels import load_images
from eva_pipeline.loader.transforms import to_model_input
from eva_pipeline.manifest import Manifest
from eva_pipeline.models import EvaMIM, load_official_checkpoint
from eva_pipeline.pipelines.common import build_teacher, split_rows, student_config
from eva_pipeline.training.recipe import initial_student

_LABELS = {
    "probe_top1_pretrained": "EVA student (pre-trained)",
    "probe_top1_random": "same ViT, random init",
    "probe_top1_raw_pixels": "raw pixels",
    "probe_top1_teacher": "teacher features (ceiling)",
}


def _patch_tokens(model: EvaMIM):
    """Frozen features of a student: final-norm patch tokens (cls excluded), read out by extract_features."""
    model.eval()
    return lambda x: model.forward_features(x)[:, 1:]


def _raw_pixels(x: torch.Tensor) -> torch.Tensor:
    """The baseline a sceptic tries first: the stored uint8 pixels, flattened once (not the model input, whose
    grayscale is copied to 3 channels: three copies of each pixel would weaken the probe's L2 penalty on them)."""
    return x.flatten(1).float() / 255.0


def linear_probe(
    manifest: Manifest | pd.DataFrame,
    student_state: dict[str, torch.Tensor],
    params: EvaluationParams,
    student: PretrainParams,
    teacher_params: TeacherTargetsParams,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Top-1 of one linear probe on held-out images: pre-trained student vs its random init, raw pixels (and the
    teacher), every encoder through the same readout, standardisation, classifier and split.

    ``student``: the resolved student config (``student_config``), from which the probe rebuilds the student's
    architecture and its initialisation (its seed).

    Returned twice: as plain JSON (DVC metrics) and in kedro-mlflow's metric format (logged to the run).
    """
    rows = split_rows(manifest, "probe")
    if rows["label"].isna().any():
        raise ValueError("every 'probe' image needs a label for the linear probe; check the ingestion sources")
    labels = rows["label"].to_numpy(dtype="int64")
    probe = _probe_config(params)
    train_idx, test_idx = split_probe(labels, probe)
    target_dim = int(student_state["lm_head.weight"].shape[0])
    config = student_config(student.model, target_dim=target_dim)
    pixels = load_images(rows)
    images = to_model_input(pixels, config.img_size)

    pretrained = EvaMIM(config)
    load_official_checkpoint(pretrained, student_state)
    encoders = {  # key: (encoder, what it reads)
        "probe_top1_pretrained": (_patch_tokens(pretrained), images),
        "probe_top1_random": (_patch_tokens(initial_student(student, target_dim)), images),  # training's start
        "probe_top1_raw_pixels": (_raw_pixels, pixels),
    }
    if params.include_teacher:
        teacher = build_teacher(teacher_params.teacher, teacher_params.device)
        grid = (config.grid_size, config.grid_size)
        encoders["probe_top1_teacher"] = (lambda x: teacher.targets(x, grid), images)

    metrics: dict[str, float] = {}
    for key, (encode, inputs) in encoders.items():
        features = extract_features(encode, inputs, batch_size=params.batch_size, pool=params.probe.readout)
        metrics[key] = linear_probe_top1(
            features[train_idx], labels[train_idx], features[test_idx], labels[test_idx], probe
        )
    metrics["probe_gain"] = metrics["probe_top1_pretrained"] - metrics["probe_top1_random"]
    metrics["probe_gain_over_raw_pixels"] = metrics["probe_top1_pretrained"] - metrics["probe_top1_raw_pixels"]
    metrics["probe_chance"] = 1.0 / len(set(labels.tolist()))
    return metrics, {key: {"value": value, "step": 0} for key, value in metrics.items()}


def _probe_config(params: EvaluationParams) -> ProbeConfig:
    p = params.probe
    return ProbeConfig(
        test_fraction=p.test_fraction, seed=p.seed, C=p.C, max_iter=p.max_iter, standardize=p.standardize
    )


def plot_probe(metrics: dict[str, float]) -> Figure:
    bars = {_LABELS[k]: v for k, v in metrics.items() if k in _LABELS}
    return probe_bar_chart(
        bars,
        title="Linear probe top-1 on the held-out split (same probe for every row)",
        chance=metrics["probe_chance"],
    )
