"""Evaluation: frozen-feature extraction, the linear probe, classification scores, robustness stand-ins, the
evaluation sets of the classification table and the table itself, and the report's figures (no Kedro here).
``eva_pipeline.evaluation.explore`` looks into a finished run for notebooks/explore_run.ipynb."""

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
    eval_sets_bar_chart,
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
from eva_pipeline.evaluation.sets import (
    RENDITIONS,
    EvalSet,
    NaturalAdversarialReference,
    SetRows,
    build_eval_set,
    label_set,
    natural_adversarial_reference,
    score_set,
    select_set_rows,
    set_logits,
)
from eva_pipeline.evaluation.table import (
    classification_json,
    classification_table,
    table_markdown,
)

__all__ = [
    "DEFAULT_PROBE_CONFIG",
    "DEFAULT_STYLE",
    "NATURAL_ADVERSARIAL_CLASSES",
    "PAPER_AVERAGE_SETS",
    "RENDITIONS",
    "ROBUSTNESS_SETS",
    "EvalSet",
    "NaturalAdversarialReference",
    "PlotStyle",
    "ProbeConfig",
    "RobustnessSet",
    "SetRows",
    "build_eval_set",
    "build_probe",
    "classification_json",
    "classification_table",
    "eval_sets_bar_chart",
    "extract_features",
    "inverted",
    "label_set",
    "linear_probe_top1",
    "load_real_labels",
    "load_subset_indices",
    "loss_curve",
    "mask_overlay",
    "mask_overview",
    "natural_adversarial",
    "natural_adversarial_reference",
    "probe_bar_chart",
    "readable_name",
    "real_accuracy",
    "robustness_average",
    "robustness_gap",
    "score_set",
    "select_set_rows",
    "set_logits",
    "sketch",
    "split_probe",
    "subset_accuracy",
    "table_markdown",
    "topk_accuracy",
]
