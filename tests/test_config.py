"""Parameter layering and typed teacher options: an environment that changes the teacher kind gets its own teacher.

The bug these guard against: conf/base's EfficientNet teacher option ``block_index`` merged key by key into eva01's
open_clip teacher and crashed the run when the teacher was built.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from kedro.config import OmegaConfigLoader
from pydantic import ValidationError

from eva_pipeline.config import TEACHER_OPTIONS, TeacherParams, TeacherTargetsParams
from eva_pipeline.config_loader import KindAwareConfigLoader, replace_kind_blocks
from eva_pipeline.settings import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS

CONF = Path(__file__).resolve().parents[1] / "conf"


def _parameters(env: str, loader_class: type = CONFIG_LOADER_CLASS) -> dict:
    return loader_class(conf_source=str(CONF), env=env, **CONFIG_LOADER_ARGS)["parameters"]


def test_the_project_uses_the_kind_aware_loader():
    assert CONFIG_LOADER_CLASS is KindAwareConfigLoader


def test_eva01_teacher_is_eva01s_block_alone():
    written = yaml.safe_load((CONF / "eva01" / "parameters_teacher_targets.yml").read_text())
    merged = _parameters("eva01")["teacher_targets"]
    assert merged["teacher"] == written["teacher_targets"]["teacher"]  # no block_index from conf/base
    TeacherTargetsParams.model_validate(merged)  # and it validates
    # the rest of the block still layers key by key: eva01 does not restate base-only keys
    assert merged["views_per_image"] == written["teacher_targets"]["views_per_image"]


def test_plain_soft_merge_would_leak_the_base_teachers_option():
    """The failure mode itself, with Kedro's own loader: this is what the kind rule prevents."""
    merged = _parameters("eva01", OmegaConfigLoader)["teacher_targets"]["teacher"]
    assert merged["options"]["block_index"] == 10
    with pytest.raises(ValidationError, match="block_index"):
        TeacherParams.model_validate(merged)


def test_a_block_with_a_kind_is_replaced_and_one_without_is_merged():
    base = {"t": {"teacher": {"kind": "a", "options": {"x": 1, "y": 2}}, "batch": 8, "other": {"p": 1, "q": 2}}}
    assert replace_kind_blocks(base, {"t": {"teacher": {"kind": "b", "options": {"z": 3}}}}) == {
        "t": {"batch": 8, "other": {"p": 1, "q": 2}}  # the teacher block is dropped from base: env's stands alone
    }
    assert replace_kind_blocks(base, {"t": {"teacher": {"options": {"x": 5}}}}) == base  # no kind: key-by-key merge
    assert replace_kind_blocks(base, {"u": {"kind": "c"}}) == base  # a block base does not have


def test_the_loader_layers_an_environment_by_the_kind_rule(tmp_path):
    base = {"t": {"teacher": {"kind": "a", "options": {"x": 1, "y": 2}}, "batch": 8, "other": {"p": 1, "q": 2}}}
    env = {"t": {"teacher": {"kind": "b", "options": {"z": 3}}, "other": {"q": 9}}}
    for name, values in (("base", base), ("env", env)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "parameters.yml").write_text(yaml.safe_dump(values))
    merged = KindAwareConfigLoader(conf_source=str(tmp_path), env="env", **CONFIG_LOADER_ARGS)["parameters"]
    assert merged == {"t": {"teacher": {"kind": "b", "options": {"z": 3}}, "batch": 8, "other": {"p": 1, "q": 9}}}


def test_a_foreign_teacher_option_is_refused_by_name():
    with pytest.raises(ValidationError) as err:
        TeacherParams.model_validate({"kind": "open_clip", "options": {"model_name": "ViT-L-14", "block_index": 10}})
    message = str(err.value)
    assert "teacher kind 'open_clip' has no option(s) ['block_index']" in message
    assert "model_name" in message and "conf/eva01/README.md" in message


def test_teacher_options_are_typed_and_completed():
    teacher = TeacherParams.model_validate({"kind": "efficientnet_lite0", "options": {"block_index": 7}})
    assert teacher.options == {"block_index": 7, "weights_path": None, "precision": "fp32"}
    with pytest.raises(ValidationError, match="block_index"):
        TeacherParams.model_validate({"kind": "efficientnet_lite0", "options": {"block_index": -1}})
    with pytest.raises(ValidationError, match="precision"):
        TeacherParams.model_validate({"kind": "open_clip", "options": {"precision": "fp8"}})


@pytest.mark.parametrize("kind", sorted(TEACHER_OPTIONS))
def test_teacher_options_match_the_teacher_constructor(kind):
    """The options model of each kind lists exactly its class's keyword arguments (device comes from the stage),
    with the same defaults: the typed config cannot drift from the code it configures."""
    from eva_pipeline.teachers import EfficientNetLiteTeacher, OpenClipTeacher

    cls = {"open_clip": OpenClipTeacher, "efficientnet_lite0": EfficientNetLiteTeacher}[kind]
    signature = {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name not in ("self", "device")
    }
    fields = {name: f.default for name, f in TEACHER_OPTIONS[kind].model_fields.items()}
    assert fields == signature


@pytest.mark.parametrize(
    ("block", "stale", "catalog_entry"),
    [
        ("ingestion", {"cache_dir": "data/02_intermediate/ingestion_cache"}, "ingestion_scan_cache"),
        ("ingestion", {"rejections_path": "data/08_reporting/ingestion/rejections.jsonl"}, "ingestion_rejections"),
        ("teacher_targets", {"output_dir": "data/04_feature/teacher_targets"}, "teacher_targets"),
        ("pretrain", {"checkpoint": {"dir": "data/06_models/checkpoints", "every_steps": 5}}, "pretrain_checkpoints"),
    ],
)
def test_a_path_parameter_moved_to_the_catalog_is_refused_with_where_it_went(block, stale, catalog_entry):
    """A user's conf from before paths became catalog entries: the error names the entry that replaced the key."""
    from eva_pipeline.config import IngestionParams, PretrainParams

    models = {"ingestion": IngestionParams, "teacher_targets": TeacherTargetsParams, "pretrain": PretrainParams}
    values = _parameters("local")[block]
    models[block].model_validate(values)  # the current conf is valid
    key = next(iter(stale))
    values = {**values, key: {**values[key], **stale[key]} if isinstance(stale[key], dict) else stale[key]}
    with pytest.raises(ValidationError) as err:
        models[block].model_validate(values)
    message = " ".join(str(err.value).split())
    assert "is no longer a parameter" in message and f"catalog entry {catalog_entry}" in message
    assert "conf/<env>/catalog.yml" in message


# ------------------------------------------------------------------------------------------------ ingestion sources
def _source(**changes) -> dict:
    return {"name": "s", "kind": "idx", "split": "pretrain", "images": "i.gz", "labels": "l.gz", **changes}


def test_sources_take_every_split_and_class_names():
    from eva_pipeline.config import SourceParams

    for split in ("pretrain", "finetune", "probe", "eval"):
        assert SourceParams.model_validate(_source(split=split)).split == split
    with pytest.raises(ValidationError, match="split"):
        SourceParams.model_validate(_source(split="train"))
    assert SourceParams.model_validate(_source(classes=["a", "b"])).classes == ["a", "b"]
    assert SourceParams.model_validate(_source()).classes is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"classes": ["a", "b", "a"]}, r"class names must be unique, repeated: \['a'\]"),
        ({"classes": []}, "'classes' must be one or more non-empty names"),
        ({"classes": ["a", ""]}, "'classes' must be one or more non-empty names"),
        ({"kind": "image_folder", "labels": None, "classes": ["a"]}, "class names are its class folders, sorted"),
        ({"labels": None, "classes": ["a"]}, "the idx source has no labels file"),
    ],
)
def test_class_names_are_refused_before_any_node_runs(changes, message):
    """The same refusals as eva_pipeline.ingest.scan.SourceSpec's, at parameter validation."""
    from eva_pipeline.config import SourceParams
    from eva_pipeline.ingest.scan import SourceSpec

    with pytest.raises(ValidationError, match=message):
        SourceParams.model_validate(_source(**changes))
    with pytest.raises(ValueError, match=message):
        SourceSpec(**_source(**changes))
