"""Evaluation: frozen-feature extraction, the linear probe, and the report's figures (no Kedro here)."""

from eva_pipeline.evaluation.features import extract_features
from eva_pipeline.evaluation.plots import (
    DEFAULT_STYLE,
    PlotStyle,
    loss_curve,
    mask_overlay,
    mask_overview,
    probe_bar_chart,
    readable_name,
)
from eva_pipeline.evaluation.probe import (
    DEFAULT_PROBE_CONFIG,
    ProbeConfig,
    build_probe,
    linear_probe_top1,
    split_probe,
)

__all__ = [
    "DEFAULT_PROBE_CONFIG",
    "DEFAULT_STYLE",
    "PlotStyle",
    "ProbeConfig",
    "build_probe",
    "extract_features",
    "linear_probe_top1",
    "loss_curve",
    "mask_overlay",
    "mask_overview",
    "probe_bar_chart",
    "readable_name",
    "split_probe",
]
