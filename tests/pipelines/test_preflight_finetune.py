"""Pre-flight checks of the image fine-tune stages and of the classification table: one message per problem, saying
what to change; the eva01 recipe is consistent (only what this machine lacks is listed).

The check functions on validated blocks, no Kedro run: which checks a run gets is test_preflight_selection's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from eva_pipeline.config import (
    ClassificationEvalParams,
    FinetuneParams,
    IngestionParams,
    PretrainParams,
    TargetFinetuneParams,
)
from eva_pipeline.preflight import check_classification, check_finetune
from eva_pipeline.settings import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS

#: A demo ingestion block with one source per split kind (paths are not checked here).
SOURCES = [
    {"name": "fashion_mnist_train", "kind": "idx", "split": "pretrain", "images": "a.gz", "labels": "b.gz"},
    {"name": "animal_mnist", "kind": "idx", "split": "finetune", "images": "c.gz", "labels": "d.gz"},
    {"name": "fashion_mnist_test", "kind": "idx", "split": "probe", "images": "e.gz", "labels": "f.gz"},
    {"name": "fashion_mnist_fresh", "kind": "idx", "split": "eval", "images": "g.gz", "labels": "h.gz"},
]
NAMES = "fashion_mnist_train, animal_mnist, fashion_mnist_test, fashion_mnist_fresh"


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def base(pl) -> dict:
    """conf/base's pretrain block, its fine-tune stages on CPU, and an ingestion block holding their sources."""
    stages = {
        **pl.read_yaml(pl.CONF_BASE / "parameters_finetune_intermediate.yml"),
        **pl.read_yaml(pl.CONF_BASE / "parameters_finetune.yml"),
    }
    for stage in stages.values():
        stage["device"] = "cpu"
    return {
        "ingestion": IngestionParams.model_validate({"sources": SOURCES}),
        "pretrain": PretrainParams.model_validate(pl.base_params()["pretrain"]),
        **stages,
    }


def _stage(base: dict, name: str = "finetune_intermediate", **changes) -> list[str]:
    model = TargetFinetuneParams if name == "finetune" else FinetuneParams
    params = model.model_validate({**base[name], **changes})
    return check_finetune(name, params, base["ingestion"], base["pretrain"])


def test_the_demo_stages_pass(base, no_gpu):
    assert _stage(base) == []
    assert _stage(base, "finetune") == []


def test_a_source_that_is_not_ingested_is_named_with_the_ingested_ones(base):
    (problem,) = _stage(base, data={"sources": ["fashion_mnist_train", "imagenet21k"]})
    assert problem == (
        f"finetune_intermediate.data.sources: 'imagenet21k' is not an ingestion source (ingestion.sources: {NAMES}); "
        "add it to conf/<env>/parameters_ingestion.yml or correct the name"
    )
    (problem,) = _stage(base, "finetune", validation={"sources": ["fashion_mnist_tset"]})
    assert problem.startswith("finetune.validation.sources: 'fashion_mnist_tset' is not an ingestion source")


@pytest.mark.parametrize(("source", "split"), [("fashion_mnist_test", "probe"), ("fashion_mnist_fresh", "eval")])
def test_training_on_a_held_out_split_is_refused(base, source, split):
    (problem,) = _stage(base, "finetune", data={"sources": [source]})
    assert problem == (
        f"finetune.data.sources: '{source}' is held out (ingestion split '{split}'): its images score the probe and "
        "the classification table and are never trained on; train on a 'pretrain' or 'finetune' source"
    )
    assert _stage(base, "finetune", validation={"sources": [source]}) == []  # held-out images validate


def test_an_image_size_the_student_patch_does_not_divide_names_the_multiples(base):
    (problem,) = _stage(base, img_size=30)
    assert problem == (
        "finetune_intermediate.img_size (student pretrain.model): img_size 30 is not divisible by the patch size 4 "
        "of eva_tiny_patch4_28: use a multiple of 4 (e.g. 28 or 32)"
    )


def test_a_gpu_stage_without_a_gpu_names_device_and_precision(base, no_gpu):
    assert _stage(base, "finetune", device="cuda", precision="fp16") == [
        "finetune.device is 'cuda' but no CUDA GPU is visible to torch on this machine; run on a GPU machine (see "
        "README 'Scaling out') or set finetune.device: cpu",
        "finetune.precision 'fp16' needs a CUDA GPU (DeepSpeed does not support fp16 on CPU); use a GPU machine or "
        "set finetune.precision: fp32",
    ]


def test_gpu_ranks_need_as_many_gpus_cpu_ranks_run(base, no_gpu):
    (problem,) = _stage(base, world_size=2, device="cuda", batch_size=64)[1:]
    assert problem.startswith("finetune_intermediate.world_size is 2 (one process per GPU) but this machine has 0")
    assert _stage(base, world_size=2, device="cpu", batch_size=64) == []  # gloo ranks: nothing to check


# ------------------------------------------------------------------------------------------------ classification
def _table(**changes) -> ClassificationEvalParams:
    sets = [
        {"name": "fashion_mnist", "sources": ["fashion_mnist_test"]},
        {"name": "fresh", "sources": ["fashion_mnist_fresh"]},
    ]
    return ClassificationEvalParams.model_validate({"target": "fashion_mnist", "sets": sets, **changes})


def test_the_classification_sets_pass(base):
    assert check_classification(_table(), base["ingestion"]) == []


def test_set_and_reference_sources_that_are_not_ingested_are_named(base):
    table = _table(
        sets=[{"name": "fashion_mnist", "sources": ["fashion_mnist_test", "imagenet_v2"]}],
        reference_sources=["imagenet1k_train"],
    )
    assert check_classification(table, base["ingestion"]) == [
        f"classification_eval.sets[0] (fashion_mnist).sources: 'imagenet_v2' is not an ingestion source "
        f"(ingestion.sources: {NAMES}); add it to conf/<env>/parameters_ingestion.yml or correct the name",
        f"classification_eval.reference_sources: 'imagenet1k_train' is not an ingestion source (ingestion.sources: "
        f"{NAMES}); add it to conf/<env>/parameters_ingestion.yml or correct the name",
    ]


def test_missing_label_files_say_how_to_provide_them_offline(base, tmp_path):
    real, objectnet = tmp_path / "real.json", tmp_path / "objectnet_map.json"
    sets = [
        {"name": "fashion_mnist", "sources": ["fashion_mnist_test"]},
        {"name": "real", "sources": ["fashion_mnist_test"], "real_labels": str(real)},
        {"name": "objectnet", "sources": ["fashion_mnist_fresh"], "class_map": str(objectnet), "in_average": False},
    ]
    real_problem, map_problem = check_classification(_table(sets=sets), base["ingestion"])
    assert real_problem.startswith(f"classification_eval.sets[1] (real).real_labels: {real} does not exist; timm ships")
    timm_copy = real_problem.split("copy ")[1].split(" there")[0]
    assert Path(timm_copy).name == "imagenet_real_labels.json" and Path(timm_copy).is_file()  # offline, in timm
    assert map_problem.startswith(f"classification_eval.sets[2] (objectnet).class_map: {objectnet} does not exist")
    assert "folder_to_objectnet_label.json" in map_problem and "objectnet_to_imagenet_1k.json" in map_problem
    real.write_text("[]")
    objectnet.write_text("{}")
    assert check_classification(_table(sets=sets), base["ingestion"]) == []


def test_a_target_that_is_not_a_set_is_refused_by_name():
    with pytest.raises(ValidationError, match=r"target 'imagenet' is not one of the sets \['fashion_mnist', 'fresh'\]"):
        _table(target="imagenet")


# ------------------------------------------------------------------------------------------------ eva01
@pytest.fixture(scope="module")
def eva01(pl) -> dict:
    raw = CONFIG_LOADER_CLASS(conf_source=str(pl.PROJECT_ROOT / "conf"), env="eva01", **CONFIG_LOADER_ARGS)
    params = raw["parameters"]
    return {
        "ingestion": IngestionParams.model_validate(params["ingestion"]),
        "pretrain": PretrainParams.model_validate(params["pretrain"]),
        "finetune_intermediate": FinetuneParams.model_validate(params["finetune_intermediate"]),
        "finetune": TargetFinetuneParams.model_validate(params["finetune"]),
        "classification_eval": ClassificationEvalParams.model_validate(params["classification_eval"]),
    }


@pytest.mark.parametrize(("name", "ranks"), [("finetune_intermediate", 64), ("finetune", 32)])
def test_eva01_stages_lack_only_gpus(eva01, name, ranks, no_gpu):
    problems = check_finetune(name, eva01[name], eva01["ingestion"], eva01["pretrain"])
    assert [p.split(" ")[0] for p in problems] == [f"{name}.device", f"{name}.precision", f"{name}.world_size"]
    assert f"{name}.world_size is {ranks}" in problems[2]


def test_eva01_classification_lacks_only_the_label_files(eva01, pl):
    problems = check_classification(eva01["classification_eval"], eva01["ingestion"])
    present = {
        p: (pl.PROJECT_ROOT / p).exists()
        for p in ("data/01_raw/imagenet1k/real.json", "data/01_raw/objectnet/class_map.json")
    }
    expected = []
    if not present["data/01_raw/imagenet1k/real.json"]:
        expected.append("classification_eval.sets[2] (imagenet_real).real_labels:")
    if not present["data/01_raw/objectnet/class_map.json"]:
        expected.append("classification_eval.sets[6] (objectnet).class_map:")
    assert [" ".join(p.split(" ")[:2]) for p in problems] == expected
