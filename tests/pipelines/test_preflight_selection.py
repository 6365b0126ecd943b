"""Which pre-flight checks a run gets: chosen from its nodes' tags and the datasets they consume, never their names.

One function (``eva_pipeline.preflight.select_checks``) serves the pre-flight hook and the dry run; these tests run
the hook on registered pipelines and slices of them with the check functions recorded (nothing is really checked).
"""

from __future__ import annotations

import pytest
from kedro.framework.project import configure_project
from kedro.pipeline import Node, Pipeline

from eva_pipeline import preflight
from eva_pipeline.hooks import PreflightHook
from eva_pipeline.pipeline_registry import register_pipelines
from eva_pipeline.preflight import (
    CLASSIFICATION,
    FINETUNE,
    SOURCES,
    STORED_STUDENT_CONFIG,
    TEACHER,
    TRAINING,
    PreflightError,
)

#: The check functions the selected checks run, by the name recorded (the fine-tune and classification ones, by
#: their block: ``check_finetune:<block>``, ``check_classification``).
FUNCTIONS = ("check_sources", "check_model", "check_world_size", "check_augmentation", "check_teacher")


@pytest.fixture(scope="module")
def registry() -> dict[str, Pipeline]:
    configure_project("eva_pipeline")
    return register_pipelines()


class _Catalog:
    """The ``params:<block>`` entries a session's catalog holds (plain dicts, as before validation)."""

    def __init__(self, params: dict[str, dict]) -> None:
        self.params = params

    def load(self, name: str):
        return self.params[name.removeprefix("params:")]


@pytest.fixture
def recorded(monkeypatch):
    """Replace the check functions by recorders: which ones a run calls (device checks by what they check)."""
    calls: list[str] = []

    def device(*args, what: str = "pretrain", **kwargs) -> list[str]:
        calls.append(f"device:{what}")
        return []

    def finetune(name: str, params, ingestion, pretrain) -> list[str]:
        calls.append(f"check_finetune:{name}")
        return []

    for name in FUNCTIONS:
        monkeypatch.setattr(preflight, name, lambda *a, _name=name, **k: calls.append(_name) or [])
    monkeypatch.setattr(preflight, "check_device", device)
    monkeypatch.setattr(preflight, "check_finetune", finetune)
    monkeypatch.setattr(preflight, "check_classification", lambda *a: calls.append("check_classification") or [])
    return calls


def _hook(pipeline: Pipeline, params: dict, runtime_params: dict | None = None) -> None:
    PreflightHook().before_pipeline_run({"runtime_params": runtime_params or {}}, pipeline, _Catalog(params))


def _renamed(pipeline: Pipeline) -> Pipeline:
    return Pipeline([node._copy(name=f"step_{i}") for i, node in enumerate(pipeline.nodes)])


SELECTED = {
    "ingestion": [SOURCES],
    "student_config": [],
    "teacher_targets": [TEACHER, STORED_STUDENT_CONFIG],
    "train_student": [TRAINING, STORED_STUDENT_CONFIG],
    "evaluation": [TEACHER, STORED_STUDENT_CONFIG],
    "pretrain": [SOURCES, TRAINING, TEACHER],
    "finetune_intermediate": [FINETUNE, STORED_STUDENT_CONFIG],
    "finetune": [FINETUNE, STORED_STUDENT_CONFIG],
}


@pytest.mark.parametrize("name", list(SELECTED))
def test_each_pipeline_selects_the_checks_its_nodes_declare(name, registry):
    assert preflight.select_checks(registry[name].nodes) == SELECTED[name]


@pytest.mark.parametrize("name", list(SELECTED))
def test_renaming_the_nodes_changes_no_check(name, registry):
    renamed = _renamed(registry[name])
    assert {n.name for n in renamed.nodes}.isdisjoint(n.name for n in registry[name].nodes)
    assert preflight.select_checks(renamed.nodes) == SELECTED[name]


def _finetune_params(pl) -> dict:
    return pl.base_params()  # every block of conf/base, the fine-tune stages included


def _scoring_node() -> Node:
    """A node as the classification_eval pipeline declares it: it reads params:classification_eval."""
    return Node(
        lambda models, params: {},
        inputs=["finetuned_models", "params:classification_eval"],
        outputs="classification_scores",
        name="score_classifiers",
        tags=[CLASSIFICATION],
    )


def test_fine_tune_nodes_name_their_stage_by_the_block_they_read(registry):
    assert preflight.finetune_blocks(registry["finetune_intermediate"].nodes) == ["finetune_intermediate"]
    assert preflight.finetune_blocks(registry["finetune"].nodes) == ["finetune"]
    both = _renamed(registry["finetune_intermediate"] + registry["finetune"])
    assert preflight.finetune_blocks(both.nodes) == ["finetune_intermediate", "finetune"]
    assert preflight.finetune_blocks(registry["pretrain"].nodes) == []


def test_the_hook_checks_the_fine_tune_stages_of_the_run_only(registry, recorded, pl):
    params = _finetune_params(pl)
    _hook(registry["finetune"], params)
    assert recorded == ["check_finetune:finetune"]
    recorded.clear()
    _hook(registry["finetune_intermediate"] + registry["finetune"], params)
    assert recorded == ["check_finetune:finetune_intermediate", "check_finetune:finetune"]
    recorded.clear()
    _hook(registry["pretrain"], params)  # a slice without fine-tune or scoring nodes runs none of their checks
    assert not {"check_finetune:finetune_intermediate", "check_finetune:finetune", "check_classification"} & set(
        recorded
    )


def test_the_hook_checks_the_classification_sets_for_a_scoring_node(registry, recorded, pl):
    scoring = Pipeline([_scoring_node()])
    assert preflight.select_checks(scoring.nodes) == [CLASSIFICATION]
    table = {"target": "fmnist", "sets": [{"name": "fmnist", "sources": ["fashion_mnist_test"]}]}
    _hook(scoring, {**pl.base_params(), "classification_eval": table})
    assert recorded == ["check_classification"]
    recorded.clear()
    _hook(registry["finetune"] + scoring, {**_finetune_params(pl), "classification_eval": table})
    assert recorded == ["check_finetune:finetune", "check_classification"]


def test_the_hook_refuses_a_fine_tune_on_held_out_images(registry, pl):
    params = _finetune_params(pl)
    params["finetune"]["data"]["sources"] = ["fashion_mnist_test"]
    with pytest.raises(PreflightError, match=r"finetune\.data\.sources: 'fashion_mnist_test' is held out"):
        _hook(registry["finetune"], params)


def test_slices_get_exactly_their_nodes_checks(registry):
    pretrain = registry["pretrain"]
    # --from-nodes pretrain_student: training and the probe; the stored student config, none of the sources
    assert preflight.select_checks(pretrain.from_nodes("pretrain_student").nodes) == [
        TRAINING,
        TEACHER,
        STORED_STUDENT_CONFIG,
    ]
    # --to-nodes compute_teacher_targets: ingestion, the config and the teacher
    assert preflight.select_checks(pretrain.to_nodes("compute_teacher_targets").nodes) == [SOURCES, TEACHER]
    assert preflight.select_checks(pretrain.only_nodes("plot_probe").nodes) == []  # draws a figure, needs nothing


def test_the_hook_runs_the_selected_checks_only(registry, recorded, pl):
    params = pl.base_params()
    _hook(registry["evaluation"], params)
    assert recorded == ["check_teacher", "device:teacher_targets"]
    recorded.clear()
    _hook(registry["ingestion"], params)
    assert recorded == ["check_sources"]
    recorded.clear()
    _hook(registry["pretrain"].from_nodes("pretrain_student"), params)
    assert recorded == [
        "check_model",
        "device:pretrain",
        "check_world_size",
        "check_augmentation",
        "check_teacher",
        "device:teacher_targets",
    ]
    recorded.clear()
    _hook(_renamed(registry["pretrain"]), params)  # the whole run: every check, whatever the nodes are called
    assert set(recorded) == {*FUNCTIONS, "device:pretrain", "device:teacher_targets"}


def test_training_with_the_online_teacher_checks_the_teacher_too(registry, recorded, pl):
    params = pl.base_params()
    _hook(registry["train_student"], params)
    assert "check_teacher" not in recorded  # cached targets: training never builds the teacher
    recorded.clear()
    params["teacher_targets"]["mode"] = "online"
    _hook(registry["train_student"], params)
    assert recorded[-2:] == ["check_teacher", "device:teacher_targets"]


def test_pretrain_overrides_without_the_student_config_pipeline_are_refused(registry, recorded, pl):
    params = pl.base_params()
    with pytest.raises(PreflightError, match=r"--params pretrain\.epochs,pretrain\.optimizer\.lr.*student_config"):
        _hook(registry["train_student"], params, {"pretrain": {"epochs": 2, "optimizer": {"lr": 5e-4}}})
    _hook(registry["train_student"], params, {"teacher_targets": {"batch_size": 8}})  # not the pretrain block
    _hook(registry["student_config"] + registry["train_student"], params, {"pretrain": {"epochs": 2}})  # resolved
    _hook(registry["pretrain"], params, {"pretrain": {"epochs": 2}})


def test_the_dry_run_uses_the_same_selection(registry, monkeypatch, pl):
    from eva_pipeline.config import IngestionParams, PretrainParams, TeacherTargetsParams
    from eva_pipeline.dry_run import dry_run

    seen: list[list[str]] = []
    real = preflight.run_checks
    monkeypatch.setattr(preflight, "run_checks", lambda checks, *a, **k: seen.append(list(checks)) or real(checks, *a))
    params = pl.base_params()
    blocks = (
        IngestionParams.model_validate(params["ingestion"]),
        TeacherTargetsParams.model_validate(params["teacher_targets"]),
        PretrainParams.model_validate(params["pretrain"]),
    )
    for name in ("pretrain", "evaluation"):
        dry_run(*blocks, num_images=10_000, nodes=_renamed(registry[name]).nodes)
    assert seen == [SELECTED["pretrain"], SELECTED["evaluation"]]


def test_the_fine_tune_dry_run_uses_the_same_selection(registry, monkeypatch, pl):
    from eva_pipeline.config import FinetuneParams, IngestionParams, PretrainParams, TargetFinetuneParams
    from eva_pipeline.dry_run import StageData, dry_run_finetune

    seen: list[tuple[list[str], list[str]]] = []
    real = preflight.run_checks

    def recording(checks, *args, **kwargs):
        seen.append((list(checks), list(kwargs["finetune"])))
        return real(checks, *args, **kwargs)

    monkeypatch.setattr(preflight, "run_checks", recording)
    params = _finetune_params(pl)
    stages = {
        "finetune_intermediate": FinetuneParams.model_validate(params["finetune_intermediate"]),
        "finetune": TargetFinetuneParams.model_validate(params["finetune"]),
    }
    args = (IngestionParams.model_validate(params["ingestion"]), PretrainParams.model_validate(params["pretrain"]))
    data = {"finetune_intermediate": StageData(6000, 20, "test"), "finetune": StageData(1000, 10, "test")}
    dry_run_finetune(*args, stages, data, nodes=_renamed(registry["finetune"]).nodes)
    dry_run_finetune(*args, stages, data)  # no nodes: every stage given
    assert seen == [
        ([FINETUNE, STORED_STUDENT_CONFIG], ["finetune"]),
        ([FINETUNE], ["finetune_intermediate", "finetune"]),
    ]
