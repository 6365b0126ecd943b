"""Evaluation: frozen-feature extraction, the linear probe, classification scores and the report's figures (no Kedro
here)."""

from eva_pipeline.evaluation.classification import (
    PAPER_AVERAGE_SETS,
    load_real_labels,
    load_subset_indices,
    real_accuracy,
    robustness_average,
    robustness_gap,
    subset_accuracy,
    topk_accuracy,
)
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
    "PAPER_AVERAGE_SETS",
    "PlotStyle",
    "ProbeConfig",
    "build_probe",
    "extract_features",
    "linear_probe_top1",
    "load_real_labels",
    "load_subset_indices",
    "loss_curve",
    "mask_overlay",
    "mask_overview",
    "probe_bar_chart",
    "readable_name",
    "real_accuracy",
    "robustness_average",
    "robustness_gap",
    "split_probe",
    "subset_accuracy",
    "topk_accuracy",
]
