"""Evaluation: frozen-feature extraction, the linear probe, classification scores, robustness stand-ins and the
report's figures (no Kedro here)."""

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
from eva_pipeline.evaluation.robustness import (
    NATURAL_ADVERSARIAL_CLASSES,
    ROBUSTNESS_SETS,
    RobustnessSet,
    inverted,
    natural_adversarial,
    sketch,
)

__all__ = [
    "DEFAULT_PROBE_CONFIG",
    "DEFAULT_STYLE",
    "NATURAL_ADVERSARIAL_CLASSES",
    "PAPER_AVERAGE_SETS",
    "ROBUSTNESS_SETS",
    "PlotStyle",
    "ProbeConfig",
    "RobustnessSet",
    "build_probe",
    "extract_features",
    "inverted",
    "linear_probe_top1",
    "load_real_labels",
    "load_subset_indices",
    "loss_curve",
    "mask_overlay",
    "mask_overview",
    "natural_adversarial",
    "probe_bar_chart",
    "readable_name",
    "real_accuracy",
    "robustness_average",
    "robustness_gap",
    "sketch",
    "split_probe",
    "subset_accuracy",
    "topk_accuracy",
]
