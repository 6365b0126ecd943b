"""The teacher_targets pipeline alone: receipt, the target store on disk, and reuse of the store on a re-run.

The store is the folder of the ``teacher_targets`` catalog entry (the node writes into it as
``teacher_targets_store``); the receipt lies in it and names no path."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from eva_pipeline.datasets import RECEIPT_FILE, TeacherTargets
from eva_pipeline.loader.heldout import validation_rows
from eva_pipeline.loader.pixels import load_images
from eva_pipeline.loader.transforms import resize_uint8, to_model_input
from eva_pipeline.manifest import manifest_digest, select_split
from eva_pipeline.targets import extract as extract_mod
from eva_pipeline.targets.store import TargetStore
from eva_pipeline.teachers import create_teacher

GRID, TARGET_DIM = 7, 112  # eva_tiny_patch4_28: 28 px / patch 4; EfficientNet-Lite0 block 10: 112 channels


def _receipt(workspace) -> dict:
    return json.loads((workspace.path("teacher_targets") / RECEIPT_FILE).read_text())


def _store_files(store: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(store.iterdir())}


def test_receipt_describes_the_stored_targets(workspace, pl):
    workspace.run("teacher_targets")
    receipt = _receipt(workspace)
    manifest = pd.read_parquet(workspace.path("manifest"))

    assert receipt["mode"] == "cached"
    # every option recorded, defaults included: the store's fingerprint describes the teacher completely
    assert receipt["teacher"] == {
        "kind": "efficientnet_lite0",
        "options": {"block_index": 10, "weights_path": None, "precision": "fp32"},
    }
    assert receipt["num_items"] == pl.PRETRAIN_IMAGES
    assert receipt["grid"] == [GRID, GRID] and receipt["img_size"] == 28
    assert receipt["target_dim"] == TARGET_DIM
    assert receipt["manifest_digest"] == manifest_digest(select_split(manifest, "pretrain"))
    assert "store" not in receipt and receipt["fingerprint"]["manifest_digest"] == receipt["manifest_digest"]
    targets = workspace.catalog.load("teacher_targets")  # what training gets
    assert isinstance(targets, TeacherTargets) and targets.store_root == workspace.path("teacher_targets")
    assert targets.store_root.is_relative_to(workspace.root)  # the catalog's folder, under the test's tmp
    assert targets.receipt() == receipt and targets.reader().shape[-1] == TARGET_DIM


def test_store_on_disk_holds_one_target_per_patch(workspace, pl):
    workspace.run("teacher_targets")
    store = workspace.path("teacher_targets")

    assert (store / "meta.json").is_file() and sorted(store.glob("shard_*.pt"))
    targets = TargetStore(store).load()
    assert targets.shape == (pl.PRETRAIN_IMAGES, GRID * GRID, TARGET_DIM)
    assert targets.dtype == torch.float16 and torch.isfinite(targets).all()
    assert targets.float().std() > 0  # real features, not a constant


def test_rerun_reuses_the_store_without_calling_the_teacher(workspace, monkeypatch):
    workspace.run("teacher_targets")
    store = workspace.path("teacher_targets")
    before, receipt_before = _store_files(store), _receipt(workspace)
    calls = []
    real_build = extract_mod.create_teacher

    def counting_build(*args, **kwargs):
        calls.append("built")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(extract_mod, "create_teacher", counting_build)
    workspace.run_again("teacher_targets")

    assert calls == []
    assert {k: v for k, v in _store_files(store).items() if k != RECEIPT_FILE} == {
        k: v for k, v in before.items() if k != RECEIPT_FILE
    }  # no shard or meta.json rewritten (the receipt is saved again, the same)
    assert _receipt(workspace) == receipt_before


def test_validation_store_holds_the_teachers_targets_of_evenly_spaced_held_out_images(workspace):
    """The validation MIM loss compares the student with these: the teacher's targets of whole probe images."""
    workspace.run("teacher_targets")
    validation = _receipt(workspace)["validation"]
    wanted = workspace.params["teacher_targets"]["validation"]["num_images"]
    assert validation["split"] == "probe" and validation["num_images"] == wanted
    store = workspace.catalog.load("teacher_targets").validation_root
    assert store == workspace.path("teacher_targets") / "validation"

    probe = select_split(pd.read_parquet(workspace.path("manifest")), "probe")
    rows = validation_rows(len(probe), wanted)
    assert len(set(probe.iloc[rows]["label"])) == 10  # evenly spaced: every class of the held-out split
    images = load_images(probe.iloc[rows])
    inputs = to_model_input(torch.stack([resize_uint8(im, 28) for im in images]), 28)
    teacher = create_teacher("efficientnet_lite0", block_index=10)
    expected = teacher.targets(inputs, (GRID, GRID))
    stored = TargetStore(store).load(validation["fingerprint"])
    assert stored.shape == expected.shape == (wanted, GRID * GRID, TARGET_DIM)
    torch.testing.assert_close(stored.float(), expected.float(), atol=2e-2, rtol=1e-2)  # fp16 storage
