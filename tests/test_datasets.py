"""The project's Kedro datasets of ``eva_pipeline.datasets`` (ManifestDataset: tests/pipelines/ingestion/).

Folders updated in place (``FolderDataset``), JSON lines (``JsonLinesDataset``), the teacher targets with their
receipt (``TeacherTargetsDataset``: refuses an incomplete store) and the resolved student config
(``StudentConfigDataset``): each saved and loaded back, and each failure a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from kedro.io import DatasetError

from eva_pipeline.config import PretrainParams
from eva_pipeline.datasets import (
    RECEIPT_FILE,
    VALIDATION_STORE,
    FolderDataset,
    JsonLinesDataset,
    StudentConfigDataset,
    TeacherTargets,
    TeacherTargetsDataset,
)
from eva_pipeline.targets.layout import TargetStoreError
from eva_pipeline.targets.store import TargetStore
from eva_test_support import make_params

ITEMS, TOKENS, DIM = 6, 4, 3


# ------------------------------------------------------------------------------------------------ FolderDataset
def test_folder_dataset_loads_its_path_and_refuses_to_save(tmp_path):
    dataset = FolderDataset(filepath=str(tmp_path / "cache"))
    assert dataset.load() == tmp_path / "cache"  # a handle: the folder need not exist yet
    assert not dataset.exists()
    (tmp_path / "cache").mkdir()
    assert dataset.exists()
    with pytest.raises(DatasetError, match="written in place by the node that loads it"):
        dataset.save(tmp_path)


# ------------------------------------------------------------------------------------------------ JsonLinesDataset
def test_json_lines_round_trip_from_records_and_from_a_finished_file(tmp_path):
    records = [{"source": "a", "location": "x.png", "reason": "corrupt"}, {"source": "b", "reason": "tiny", "n": 3}]
    dataset = JsonLinesDataset(filepath=str(tmp_path / "out" / "rejections.jsonl"))
    assert not dataset.exists()
    dataset.save(iter(records))
    assert dataset.load() == records
    assert len((tmp_path / "out" / "rejections.jsonl").read_text().splitlines()) == 2

    finished = tmp_path / "work" / "rejections.tmp"
    finished.parent.mkdir()
    finished.write_text(json.dumps(records[1]) + "\n")
    dataset.save(finished)  # moved into place: memory-flat for long listings
    assert dataset.load() == [records[1]] and not finished.exists()
    dataset.save([])
    assert dataset.load() == [] and dataset.exists()


def test_json_lines_errors(tmp_path):
    dataset = JsonLinesDataset(filepath=str(tmp_path / "r.jsonl"))
    with pytest.raises(DatasetError, match="no JSON lines file at"):
        dataset.load()
    with pytest.raises(DatasetError, match="Path of a finished file or an iterable of mappings"):
        dataset.save({"one": "mapping"})
    with pytest.raises(DatasetError, match="does not exist"):
        dataset.save(tmp_path / "absent.jsonl")
    assert not dataset.exists()


# ------------------------------------------------------------------------------------------------ teacher targets
def _fill(root: Path, fingerprint: dict, items: int = ITEMS) -> None:
    """A complete store of ``items`` rows of (TOKENS, DIM) targets, 2 rows per shard."""

    def batch_fn(start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop, dtype=torch.float32)

    def teacher_fn(x: torch.Tensor) -> torch.Tensor:
        return x[:, None, None].expand(-1, TOKENS, DIM) / 10

    TargetStore(root).compute(fingerprint, items, batch_fn, teacher_fn, shard_size=2, progress=False)


def _receipt(mode: str = "cached", validation: bool = True) -> dict:
    receipt = {
        "mode": mode,
        "teacher": {"kind": "efficientnet_lite0", "options": {"block_index": 10}},
        "num_items": ITEMS,
        "grid": [2, 2],
        "img_size": 8,
        "manifest_digest": "abc",
        "views_per_image": 0,
        "target_dim": DIM,
        "validation": {"split": "probe", "num_images": 2, "fingerprint": {"v": 1}} if validation else None,
    }
    if mode == "cached":
        receipt["fingerprint"] = {"f": 1}
    return receipt


@pytest.fixture
def store(tmp_path) -> Path:
    root = tmp_path / "teacher_targets"
    _fill(root, {"f": 1})
    _fill(root / VALIDATION_STORE, {"v": 1}, items=2)
    return root


def test_teacher_targets_round_trip_gives_the_reader(store):
    dataset = TeacherTargetsDataset(filepath=str(store))
    assert not dataset.exists()
    dataset.save(_receipt())
    assert dataset.exists() and (store / RECEIPT_FILE).is_file()
    assert "store" not in json.loads((store / RECEIPT_FILE).read_text())  # no path inside the receipt
    targets = dataset.load()
    assert isinstance(targets, TeacherTargets)
    assert (targets.mode, targets.grid, targets.img_size, targets.target_dim) == ("cached", (2, 2), 8, DIM)
    assert targets.store_root == store and targets.validation_root == store / VALIDATION_STORE
    reader = targets.reader()
    assert reader.num_items == ITEMS and reader.shape[-1] == DIM
    torch.testing.assert_close(reader.get([3])[0].float(), torch.full((1, TOKENS, DIM), 0.3), rtol=1e-3, atol=1e-3)
    assert targets.receipt() == _receipt()  # the JSON form survives the round trip
    dataset.save(targets)  # a loaded TeacherTargets saves again, unchanged
    assert dataset.load() == targets


def test_teacher_targets_refuse_an_incomplete_store(store):
    dataset = TeacherTargetsDataset(filepath=str(store))
    next(iter(sorted(store.glob("shard_*.pt")))).unlink()
    with pytest.raises(DatasetError, match=r"refusing to save.*target store .* is not complete"):
        dataset.save(_receipt())
    assert not dataset.exists()
    _fill(store, {"f": 1})  # recomputes the missing shard
    dataset.save(_receipt())
    assert dataset.exists()


def test_teacher_targets_refuse_an_incomplete_validation_store_and_another_fingerprint(store):
    dataset = TeacherTargetsDataset(filepath=str(store))
    other = _receipt()
    other["validation"]["fingerprint"] = {"v": 2}
    with pytest.raises(DatasetError, match=r"validation store .* is not complete"):
        dataset.save(other)
    other = _receipt()
    other["fingerprint"] = {"f": 2}
    with pytest.raises(DatasetError, match=r"target store .* is not complete for the receipt's fingerprint"):
        dataset.save(other)
    assert not dataset.exists()


def test_reader_refuses_a_store_recomputed_since_the_receipt(store):
    dataset = TeacherTargetsDataset(filepath=str(store))
    dataset.save(_receipt())
    _fill(store, {"f": 2})  # another run recomputed the store; the receipt is stale
    with pytest.raises(TargetStoreError, match="different fingerprint"):
        dataset.load().reader()


def test_online_targets_need_no_store_but_have_no_reader(tmp_path):
    root = tmp_path / "online"
    dataset = TeacherTargetsDataset(filepath=str(root))
    dataset.save(_receipt(mode="online", validation=False))
    targets = dataset.load()
    assert targets.store_root is None and targets.validation_root is None and not targets.cached
    with pytest.raises(TargetStoreError, match="computed online"):
        targets.reader()


def test_teacher_targets_clear_errors(tmp_path):
    dataset = TeacherTargetsDataset(filepath=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=r"no teacher targets at .*kedro run --pipelines teacher_targets"):
        dataset.load()
    with pytest.raises(DatasetError, match=r"not a teacher_targets receipt.*missing \['target_dim'\]"):
        dataset.save({k: v for k, v in _receipt(mode="online").items() if k != "target_dim"})
    with pytest.raises(DatasetError, match="needs the store's fingerprint"):
        dataset.save({k: v for k, v in _receipt().items() if k != "fingerprint"})
    (tmp_path / "nowhere").mkdir()
    (tmp_path / "nowhere" / RECEIPT_FILE).write_text(json.dumps({"mode": "cached"}))
    with pytest.raises(DatasetError, match="unreadable teacher_targets receipt"):
        dataset.load()


# ------------------------------------------------------------------------------------------------ student config
def test_student_config_round_trip_fills_every_default(tmp_path):
    params = make_params(max_steps=3)
    dataset = StudentConfigDataset(filepath=str(tmp_path / "05_model_input" / "student_config.yml"))
    assert not dataset.exists()
    dataset.save(params)
    document = yaml.safe_load((tmp_path / "05_model_input" / "student_config.yml").read_text())
    assert list(document) == ["pretrain"] and document["pretrain"]["loader"] == {"num_workers": 0}  # a default
    loaded = dataset.load()
    assert isinstance(loaded, PretrainParams) and loaded == params
    dataset.save(params.model_dump(mode="json"))  # a mapping is validated, then written the same way
    assert dataset.load() == params


def test_student_config_errors(tmp_path):
    path = tmp_path / "student_config.yml"
    dataset = StudentConfigDataset(filepath=str(path))
    with pytest.raises(DatasetError, match=r"no student config at .*kedro run --pipelines student_config"):
        dataset.load()
    with pytest.raises(DatasetError, match="not a valid pretrain block"):
        dataset.save({"epochs": 0})
    stale = make_params().model_dump(mode="json")
    stale["checkpoint"]["dir"] = "data/06_models/checkpoints"  # a field this code no longer has (a catalog entry now)
    path.write_text(yaml.safe_dump({"pretrain": stale}))
    with pytest.raises(DatasetError, match=r"(?s)re-run the student_config pipeline.*checkpoint\.dir"):
        dataset.load()
    path.write_text(yaml.safe_dump({"other": {}}))
    with pytest.raises(DatasetError, match="no top-level 'pretrain' block"):
        dataset.load()
