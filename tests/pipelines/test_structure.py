"""Structure of the project's pipelines, parameters and catalog (no node runs).

* every parameter block is an input of some node, and every leaf under it is a field of the pydantic model that node
  declares for it (conf/base and conf/eva01);
* every dataset a node of the whole DAG writes or reads is declared in conf/base/catalog.yml (no accidental
  MemoryDatasets), and the catalog declares nothing that no node uses;
* every node has an explicit, readable, unique name; the registry has the stages, ``pretrain`` (the first five) and
  ``__default__`` (all of them).
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Any

import pytest
from kedro.framework.project import configure_project
from kedro.pipeline import Pipeline
from pydantic import BaseModel

from eva_pipeline.config import PARAMETER_BLOCKS
from eva_pipeline.models.config import EvaConfig
from eva_pipeline.pipeline_registry import STAGES, register_pipelines

PRETRAIN_STAGES = STAGES[:5]
NODE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
FOLDER = "eva_pipeline.datasets.FolderDataset"  # a folder its node updates in place: an input, never an output


@pytest.fixture(scope="module")
def registry() -> dict[str, Pipeline]:
    configure_project("eva_pipeline")  # find_pipelines() needs the package name
    return register_pipelines()


def _param_annotations(pipeline: Pipeline) -> dict[str, set[type]]:
    """``block`` -> the annotations of the node arguments that receive ``params:block``."""
    found: dict[str, set[type]] = {}
    for node in pipeline.nodes:
        hints = typing.get_type_hints(node.func)
        arguments = list(inspect.signature(node.func).parameters)
        for argument, dataset in zip(arguments, node.inputs, strict=True):
            if dataset.startswith("params:"):
                found.setdefault(dataset.removeprefix("params:"), set()).add(hints.get(argument, Any))
    return found


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``M``, ``M | None``, ``list[M]``), else None."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        model = _model_of(arg)
        if model is not None:
            return model
    return None


def _unknown_leaves(value: Any, annotation: Any, path: str) -> list[str]:
    """Keys under ``value`` that are not fields of the model ``annotation`` describes (recursively)."""
    model = _model_of(annotation)
    if model is None:
        return []
    if isinstance(value, list):
        return [leaf for i, item in enumerate(value) for leaf in _unknown_leaves(item, annotation, f"{path}[{i}]")]
    if value is None and type(None) in typing.get_args(annotation):
        return []  # an optional block switched off (e.g. video_ingestion.synthetic: null)
    if not isinstance(value, dict):
        return [f"{path} (a {type(value).__name__}, the model {model.__name__} wants a mapping)"]
    problems = []
    for key, item in value.items():
        field = model.model_fields.get(key)
        if field is None:
            problems.append(f"{path}.{key} (no field '{key}' in {model.__name__})")
        else:
            problems += _unknown_leaves(item, field.annotation, f"{path}.{key}")
    return problems


def _all_models(model: type[BaseModel], seen: set | None = None) -> set[type[BaseModel]]:
    seen = set() if seen is None else seen
    if model not in seen:
        seen.add(model)
        for field in model.model_fields.values():
            for candidate in (field.annotation, *typing.get_args(field.annotation)):
                inner = _model_of(candidate)
                if inner is not None:
                    _all_models(inner, seen)
    return seen


def _conf_params(env: str, pl) -> dict[str, Any]:
    blocks: dict[str, Any] = {}
    for path in sorted((pl.PROJECT_ROOT / "conf" / env).glob("parameters*.yml")):
        blocks.update(pl.read_yaml(path) or {})
    return blocks


# ------------------------------------------------------------------------------------------------ parameters
def test_one_parameters_file_per_block(pl):
    for path in sorted(pl.CONF_BASE.glob("parameters*.yml")):
        assert list(pl.read_yaml(path)) == [path.stem.removeprefix("parameters_")], path.name


def test_each_parameter_block_has_one_model_and_the_models_forbid_unknown_keys(registry):
    annotations = _param_annotations(registry["__default__"])
    for block, found in annotations.items():
        assert len(found) == 1, f"params:{block} is annotated differently by different nodes: {found}"
        (annotation,) = found
        model = _model_of(annotation)
        assert model is not None, f"params:{block} reaches a node without a pydantic annotation (not validated)"
        assert model is PARAMETER_BLOCKS[block], (block, model)  # the one table the hook and tests read
        for inner in _all_models(model):  # forbid: a key that no field takes is an error, not ignored
            assert inner.model_config.get("extra") == "forbid", inner.__name__


@pytest.mark.parametrize("env", ["base", "eva01"])
def test_every_parameter_is_consumed_by_a_node(env, registry, pl):
    annotations = _param_annotations(registry["__default__"])
    blocks = _conf_params(env, pl)
    assert blocks
    unused = sorted(set(blocks) - set(annotations))
    assert not unused, f"conf/{env}: parameter blocks no node takes as params:<block>: {unused}"
    problems = []
    for block, value in blocks.items():
        (annotation,) = annotations[block]
        problems += _unknown_leaves(value, annotation, block)
    assert not problems, f"conf/{env}: parameters that no model field takes: {problems}"


@pytest.mark.parametrize("env", ["base", "eva01"])
def test_free_form_options_name_real_arguments(env, pl):
    """The two dict-typed fields: model overrides are EvaConfig fields, teacher options constructor arguments."""
    from eva_pipeline.teachers import EfficientNetLiteTeacher, OpenClipTeacher

    blocks = _conf_params(env, pl)
    overrides = blocks.get("pretrain", {}).get("model", {}).get("overrides", {})
    assert set(overrides) <= set(EvaConfig.__dataclass_fields__), overrides
    teacher = blocks.get("teacher_targets", {}).get("teacher")
    if teacher:
        cls = {"efficientnet_lite0": EfficientNetLiteTeacher, "open_clip": OpenClipTeacher}[teacher["kind"]]
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "device"}
        assert set(teacher.get("options", {})) <= accepted, (teacher, sorted(accepted))


def test_env_files_validate_against_the_models(pl):
    """conf/base and conf/base+eva01 (layered by the loader settings.py names) give valid parameter objects."""
    from eva_pipeline.config import PARAMETER_BLOCKS as models
    from eva_pipeline.settings import CONFIG_LOADER_ARGS
    from eva_pipeline.settings import CONFIG_LOADER_CLASS as OmegaConfigLoader

    for env in ("local", "eva01"):
        loader = OmegaConfigLoader(str(pl.PROJECT_ROOT / "conf"), env=env, **CONFIG_LOADER_ARGS)
        params = loader["parameters"]
        assert set(params) == set(models)
        for block, model in models.items():
            model.model_validate(params[block])
    eva01 = OmegaConfigLoader(str(pl.PROJECT_ROOT / "conf"), env="eva01", **CONFIG_LOADER_ARGS)["parameters"]
    assert eva01["pretrain"]["model"]["name"] == "eva_giant_patch14_224"
    assert eva01["evaluation"]["probe"]["test_fraction"] == 0.4  # soft merge kept base keys eva01 does not set


# ------------------------------------------------------------------------------------------------ catalog
def test_every_dataset_is_declared_in_the_catalog(registry, pl):
    catalog = pl.read_catalog()
    pretrain = registry["__default__"]
    datasets = {d for d in pretrain.datasets() if not d.startswith("params:") and d != "parameters"}

    undeclared = sorted(datasets - set(catalog))
    assert not undeclared, f"node outputs/inputs that would be MemoryDatasets: {undeclared}"
    assert not sorted(set(catalog) - datasets), "catalog entries no node reads or writes"
    in_place = {name for name, entry in catalog.items() if entry["type"] == FOLDER}
    assert in_place, "the resumable folders are catalog entries"
    # the only free inputs: folders the nodes write into (checkpoints, caches), which are nobody's output
    assert {d for d in pretrain.inputs() if not d.startswith("params:")} == in_place, "free inputs of the DAG"
    assert not in_place & pretrain.outputs()
    assert not any(entry["type"].endswith("MemoryDataset") for entry in catalog.values())


@pytest.mark.parametrize("env", ["base", "eva01"])
def test_the_target_store_is_one_folder_named_once(env, pl):
    """The node writes into teacher_targets_store; the teacher_targets dataset is that folder with the receipt."""
    catalog = {**pl.read_catalog(), **pl.read_catalog(pl.PROJECT_ROOT / "conf" / env / "catalog.yml")}
    store, targets = catalog["teacher_targets_store"], catalog["teacher_targets"]
    assert store["type"] == FOLDER and targets["type"] == "eva_pipeline.datasets.TeacherTargetsDataset"
    assert store["filepath"] == targets["filepath"]
    raw = pl.read_yaml(pl.PROJECT_ROOT / "conf" / env / "catalog.yml")
    assert raw["teacher_targets_store"]["filepath"] == raw["teacher_targets"]["filepath"] == "${_teacher_targets}"


def test_eva01_catalog_only_moves_folders(pl):
    """conf/eva01/catalog.yml gives the paper's run its own folders; the dataset types are the base's."""
    base, eva01 = pl.read_catalog(), pl.read_catalog(pl.PROJECT_ROOT / "conf" / "eva01" / "catalog.yml")
    assert set(eva01) <= set(base)
    for name, entry in eva01.items():
        key = "path" if "path" in entry else "filepath"  # a PartitionedDataset's folder, or a file/folder dataset
        assert entry["type"] == base[name]["type"] and entry[key] != base[name][key], name


def test_catalog_paths_are_under_data_layers_and_not_versioned(pl):
    catalog = pl.read_catalog()
    for name, entry in catalog.items():
        inner = entry.get("dataset", entry)
        inner = inner if isinstance(inner, dict) else {}  # a PartitionedDataset may name its dataset type alone
        assert not inner.get("versioned", False) and not entry.get("versioned", False), name  # DVC versions data
        for path in (inner.get("filepath"), entry.get("path")):  # a file, or a PartitionedDataset's folder
            if path is not None:
                assert re.match(r"^data/0[2-8]_[a-z_]+/", path), (name, path)


# ------------------------------------------------------------------------------------------------ nodes, registry
def test_nodes_have_explicit_readable_unique_names(registry):
    names = [node.name for node in registry["__default__"].nodes]
    assert all(NODE_NAME.match(name) for name in names), names  # a default name is "func([inputs]) -> [outputs]"
    assert len(names) == len(set(names))


def test_registry_has_each_stage_pretrain_and_default(registry, pl):
    assert set(registry) == {*STAGES, "pretrain", "__default__"}
    stage_nodes = [{n.name for n in registry[stage].nodes} for stage in STAGES]
    assert all(stage_nodes), "a stage without nodes"
    assert {n.name for n in registry["__default__"].nodes} == set().union(*stage_nodes)
    assert sum(map(len, stage_nodes)) == len(registry["__default__"].nodes)  # stages do not share nodes
    pretrain_nodes = {n.name for stage in PRETRAIN_STAGES for n in registry[stage].nodes}
    assert {n.name for n in registry["pretrain"].nodes} == pretrain_nodes
    # each stage reads only what earlier stages wrote: ingestion -> ... -> finetune -> classification_eval
    catalog = pl.read_catalog()
    written = {name for name, entry in catalog.items() if entry["type"] == FOLDER}  # the stage's own folders
    for stage in STAGES:
        reads = {d for d in registry[stage].inputs() if not d.startswith("params:")}
        assert reads <= written, (stage, reads - written)
        written |= registry[stage].outputs()
    assert "teacher_targets" in registry["train_student"].inputs()
    assert "eva_student" in registry["evaluation"].inputs()
    assert {"eva_student", "class_names"} <= registry["finetune_intermediate"].inputs()
    assert "eva_intermediate" in registry["finetune"].inputs()
    assert "finetuned_models" in registry["classification_eval"].inputs()
