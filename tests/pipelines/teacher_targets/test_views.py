"""Stored augmented views end to end: the teacher_targets node stores K crops per image with their targets, and the
training loader then feeds the student exactly those crops, matched with exactly those targets."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from eva_pipeline.config import PretrainParams, TeacherTargetsParams
from eva_pipeline.datasets import TeacherTargetsDataset
from eva_pipeline.loader.batches import BatchPlan, PretrainBatches
from eva_pipeline.loader.pixels import ManifestPixels
from eva_pipeline.loader.rows import FrameRows
from eva_pipeline.loader.transforms import to_model_input
from eva_pipeline.manifest import select_split
from eva_pipeline.pipelines.common import build_teacher
from eva_pipeline.pipelines.teacher_targets.nodes import compute_teacher_targets
from eva_pipeline.preflight import PreflightError, check_augmentation, raise_if_problems
from eva_pipeline.targets.store import TargetStore
from eva_pipeline.training.recipe import epoch_order, make_augmentation, make_mask_generator

K, IMAGES = 2, 48


@pytest.fixture(scope="module")
def stored(workspace, tmp_path_factory):
    workspace.run("ingestion")
    manifest = pd.read_parquet(workspace.path("manifest"))
    rows = select_split(manifest, "pretrain").head(IMAGES)
    params = dict(workspace.params)
    teacher = TeacherTargetsParams.model_validate(
        {
            **params["teacher_targets"],
            "views_per_image": K,
            "shard_size": 20,
            "validation": {"num_images": 0},
        }  # no probe rows here
    )
    pretrain = PretrainParams.model_validate(
        {**params["pretrain"], "augmentation": {"enabled": True, "scale": [0.3, 1.0]}, "batch_size": 16}
    )
    store = tmp_path_factory.mktemp("views")
    dataset = TeacherTargetsDataset(filepath=str(store))
    dataset.save(compute_teacher_targets(rows, store, teacher, pretrain))  # checks the store is complete
    return rows, teacher, pretrain, dataset.load()


def test_training_batches_carry_the_crop_and_target_the_teacher_made(stored):
    rows, teacher_params, pretrain, targets = stored
    assert targets.views_per_image == K and targets.fingerprint["views"]["k"] == K
    reader = targets.reader()
    assert reader.num_items == IMAGES and reader.views_per_item == K and reader.has_crops
    plan = BatchPlan(
        pixels=ManifestPixels(FrameRows(rows)),
        order=epoch_order(pretrain, IMAGES),
        global_batch=16,
        rank=0,
        world_size=1,
        img_size=28,
        seed=pretrain.seed,
        masker=make_mask_generator(pretrain, 7),
        view_mode="stored",
        augment=make_augmentation(pretrain, 28),
        targets=reader,
    )
    augmented = BatchPlan(**{**plan.__dict__, "view_mode": "augment", "targets": None})
    teacher = build_teacher(teacher_params.teacher, "cpu")
    steps = PretrainBatches(plan, 0, 6)
    for step in (0, 4):  # epoch 0 -> view 0, epoch 1 -> view 1 (3 steps per epoch)
        batch = steps.batch(step)
        # What the online teacher computes from the very images the student gets equals the stored targets.
        online = teacher.targets(to_model_input(batch.images, 28), (7, 7))
        torch.testing.assert_close(batch.targets.float(), online, rtol=2e-3, atol=2e-3)
        # For the first K epochs the stored crops are the crops online augmentation draws.
        torch.testing.assert_close(batch.images, PretrainBatches(augmented, 0, 6).batch(step).images)
    first, second = steps.batch(0), steps.batch(3)  # the same images in two epochs: different stored views
    common = np.intersect1d(first.indices.numpy(), second.indices.numpy())

    def at(batch, i):
        return int(np.flatnonzero(batch.indices.numpy() == i)[0])

    assert len(common) and not torch.equal(first.images[at(first, common[0])], second.images[at(second, common[0])])


def test_rerun_with_other_views_recomputes_and_same_views_reuses(stored, tmp_path):
    rows, teacher_params, pretrain, targets = stored
    shutil.copytree(targets.store_root, tmp_path / "copy")  # the module's store stays as the other tests expect it
    store = TargetStore(tmp_path / "copy")
    before = {p.name: p.stat().st_mtime_ns for p in store.root.glob("shard_*")}
    compute_teacher_targets(rows, store.root, teacher_params, pretrain)
    assert {p.name: p.stat().st_mtime_ns for p in store.root.glob("shard_*")} == before  # reused, not recomputed
    other = PretrainParams.model_validate({**pretrain.model_dump(mode="json"), "seed": pretrain.seed + 1})
    compute_teacher_targets(rows, store.root, teacher_params, other)
    after = {p.name: p.stat().st_mtime_ns for p in store.root.glob("shard_*")}
    assert set(after) != set(before)  # another seed draws other crops: a new store layout


def test_preflight_ties_views_to_augmentation(stored):
    _, teacher_params, pretrain, _ = stored
    assert check_augmentation(pretrain, teacher_params) == []
    plain = PretrainParams.model_validate({**pretrain.model_dump(mode="json"), "augmentation": {"enabled": False}})
    with pytest.raises(PreflightError, match="views_per_image is 2"):
        raise_if_problems(check_augmentation(plain, teacher_params))
    whole = TeacherTargetsParams.model_validate({**teacher_params.model_dump(mode="json"), "views_per_image": 0})
    with pytest.raises(PreflightError, match=r"needs teacher_targets.views_per_image"):
        raise_if_problems(check_augmentation(pretrain, whole))


def test_training_node_trains_on_stored_views(stored, tmp_path):
    from eva_pipeline.pipelines.train_student.nodes import pretrain_student

    rows, teacher_params, pretrain, targets = stored
    params = PretrainParams.model_validate({**pretrain.model_dump(mode="json"), "max_steps": 4})
    _model, history, summary, _ = pretrain_student(rows, targets, tmp_path / "ckpt", params, teacher_params)
    assert list(history["step"]) == [1, 2, 3, 4] and np.isfinite(history["loss"]).all()
    assert summary["steps"] == 4.0


@pytest.mark.slow
def test_two_extraction_ranks_launched_by_the_node_write_the_same_store(stored, tmp_path):
    rows, teacher_params, pretrain, targets = stored
    ranks = TeacherTargetsParams.model_validate(
        {
            **teacher_params.model_dump(mode="json"),
            "world_size": 2,
            "device": "cpu",
            "distributed": {"launcher": "torchrun", "master_port": 29611},
        }
    )
    two = compute_teacher_targets(rows, tmp_path / "two", ranks, pretrain)
    assert (tmp_path / ".two_launch" / "ranks.log").read_text().count("rank") >= 2  # one progress bar per rank
    one_targets, one_crops = TargetStore(targets.store_root).load(with_crops=True)
    two_targets, two_crops = TargetStore(tmp_path / "two").load(two["fingerprint"], with_crops=True)
    torch.testing.assert_close(two_crops, one_crops, rtol=0, atol=0)
    torch.testing.assert_close(two_targets, one_targets, rtol=1e-3, atol=1e-3)  # other thread counts: fp16 ulps
    assert two["target_dim"] == targets.target_dim and two["fingerprint"] == targets.fingerprint
