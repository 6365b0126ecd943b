"""Target store: exact round trip, resume after a crash or a lost shard, invalidation, and clear errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from eva_pipeline.loader.transforms import to_model_input
from eva_pipeline.targets.layout import STORE_FORMAT, TargetStoreError, fingerprint_hash
from eva_pipeline.targets.store import TargetStore

NUM_ITEMS, SHARD, PATCH, DIM = 50, 16, 7, 12  # 4 shards, the last one partial (2 rows)
FINGERPRINT = {"manifest": "abc123", "teacher": "fake-projection-v1", "input_size": 28, "grid": [4, 4]}


class FakeTeacher:
    """A fixed random projection of 7x7 patches: deterministic (B, 16, 12) targets; counts calls, can crash."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.weight = torch.randn(3 * PATCH * PATCH, DIM, generator=torch.Generator().manual_seed(0))
        self.calls: list[int] = []
        self.fail_on_call = fail_on_call

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(images.shape[0])
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("simulated crash")
        patches = torch.nn.functional.unfold(images, kernel_size=PATCH, stride=PATCH)  # (B, 3*7*7, 16)
        return patches.transpose(1, 2) @ self.weight


class Batches:
    """Model-input images for rows [start, stop) of a fixed uint8 image set; records the requested ranges."""

    def __init__(self) -> None:
        self.images = torch.randint(0, 256, (NUM_ITEMS, 1, 28, 28), generator=torch.Generator().manual_seed(1))
        self.images = self.images.to(torch.uint8)
        self.ranges: list[tuple[int, int]] = []

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        self.ranges.append((start, stop))
        return to_model_input(self.images[start:stop], 28)


def _compute(root, teacher=None, fingerprint=FINGERPRINT, shard_size=SHARD, batches=None):
    teacher = teacher or FakeTeacher()
    batches = batches or Batches()
    TargetStore(root).compute(fingerprint, NUM_ITEMS, batches, teacher, shard_size=shard_size, progress=False)
    return teacher, batches


def _shard(root, index):
    """Path of shard ``index`` of the store in ``root`` (its name carries the layout id from meta.json)."""
    return TargetStore(root).shard_path(index)


def _direct() -> torch.Tensor:
    """The same targets computed without the store, shard by shard (fp32 -> fp16 as the store does)."""
    teacher, batches = FakeTeacher(), Batches()
    parts = [teacher(batches(s, min(s + SHARD, NUM_ITEMS))) for s in range(0, NUM_ITEMS, SHARD)]
    return torch.cat(parts).half()


def test_round_trip_equals_direct_computation(tmp_path) -> None:
    teacher, batches = _compute(tmp_path / "store")
    assert teacher.calls == [16, 16, 16, 2] and batches.ranges == [(0, 16), (16, 32), (32, 48), (48, 50)]
    targets = TargetStore(tmp_path / "store").load(expected_fingerprint=FINGERPRINT)
    assert targets.shape == (NUM_ITEMS, 16, DIM) and targets.dtype == torch.float16
    assert torch.equal(targets, _direct())
    whole = FakeTeacher()(Batches()(0, NUM_ITEMS))  # one big batch: equal up to fp16 rounding
    torch.testing.assert_close(targets.float(), whole, rtol=2e-3, atol=2e-3)
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert meta["fingerprint"] == FINGERPRINT and meta["fingerprint_hash"] == fingerprint_hash(FINGERPRINT)
    layout = (meta["format"], meta["num_items"], meta["views_per_item"], meta["num_rows"], meta["shard_size"])
    assert layout == (STORE_FORMAT, 50, 1, 50, 16) and meta["dtype"] == "torch.float16"
    tag = meta["layout"]
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "meta.json",
        *(f"shard_0000{i}_{tag}.pt" for i in range(4)),
    ]
    store = TargetStore(tmp_path / "store")
    assert store.is_complete(FINGERPRINT) and store.fingerprint == FINGERPRINT


def test_complete_store_is_reused_without_teacher_calls(tmp_path) -> None:
    _compute(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard_*.pt")}
    teacher, batches = _compute(tmp_path, fingerprint=dict(reversed(list(FINGERPRINT.items()))))  # key order: same
    assert teacher.calls == [] and batches.ranges == []
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard_*.pt")} == before


def test_lost_shard_is_recomputed_alone(tmp_path) -> None:
    _compute(tmp_path)
    lost = _shard(tmp_path, 1)
    kept = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard_*.pt") if p != lost}
    lost.unlink()
    assert not TargetStore(tmp_path).is_complete(FINGERPRINT)
    missing = r"incomplete: 1 of 4 shard\(s\) missing \(shard_00001_\w+\.pt\).*targets"
    with pytest.raises(TargetStoreError, match=missing):
        TargetStore(tmp_path).load()
    teacher, batches = _compute(tmp_path)
    assert teacher.calls == [16] and batches.ranges == [(16, 32)]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard_*.pt") if p != lost} == kept
    assert torch.equal(TargetStore(tmp_path).load(FINGERPRINT), _direct())


def test_crash_midway_then_resume(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        _compute(tmp_path, teacher=FakeTeacher(fail_on_call=3))
    assert sorted(tmp_path.glob("shard_*.pt")) == [_shard(tmp_path, 0), _shard(tmp_path, 1)]
    assert not list(tmp_path.glob(".*"))  # no half-written temporary files
    assert not TargetStore(tmp_path).is_complete(FINGERPRINT)
    missing = r"2 of 4 shard\(s\) missing \(shard_00002_\w+\.pt, shard_00003_\w+\.pt\)"
    with pytest.raises(TargetStoreError, match=missing):
        TargetStore(tmp_path).load()
    teacher, batches = _compute(tmp_path)
    assert teacher.calls == [16, 2] and batches.ranges == [(32, 48), (48, 50)]
    assert torch.equal(TargetStore(tmp_path).load(), _direct())


def test_changed_fingerprint_recomputes_everything(tmp_path, caplog) -> None:
    _compute(tmp_path)
    changed = {**FINGERPRINT, "teacher": "fake-projection-v2"}
    assert not TargetStore(tmp_path).is_complete(changed)
    with pytest.raises(TargetStoreError, match=r"different fingerprint \(differs in \['teacher'\]\)"):
        TargetStore(tmp_path).load(expected_fingerprint=changed)
    with caplog.at_level(logging.INFO, logger="eva_pipeline.targets.store"):
        teacher, _ = _compute(tmp_path, fingerprint=changed)
    assert teacher.calls == [16, 16, 16, 2]
    assert "fingerprint changed" in caplog.text and "removing 4 old shard(s)" in caplog.text
    assert TargetStore(tmp_path).is_complete(changed) and not TargetStore(tmp_path).is_complete(FINGERPRINT)
    assert torch.equal(TargetStore(tmp_path).load(changed), _direct())


def test_changed_shard_size_recomputes(tmp_path) -> None:
    _compute(tmp_path)
    teacher, _ = _compute(tmp_path, shard_size=32)
    assert teacher.calls == [32, 18] and len(list(tmp_path.glob("shard_*.pt"))) == 2
    assert torch.equal(TargetStore(tmp_path).load(), _direct())


@pytest.mark.parametrize("damage", ["garbage", "truncate", "foreign"])
def test_corrupt_shard_is_named_on_load_and_recomputed(tmp_path, damage) -> None:
    _compute(tmp_path)
    shard = _shard(tmp_path, 2)
    if damage == "garbage":
        shard.write_bytes(b"\x00" * 100)
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-200])
    else:  # a well-formed shard of another fingerprint copied in
        other = tmp_path / "other"
        _compute(other, fingerprint={**FINGERPRINT, "grid": [2, 2]})
        shard.write_bytes(_shard(other, 2).read_bytes())
    with pytest.raises(TargetStoreError, match=r"shard_00002_\w+\.pt is corrupt.*re-run the teacher_targets pipeline"):
        TargetStore(tmp_path).load()
    teacher, _ = _compute(tmp_path)  # the re-run the message asks for repairs exactly that shard
    assert teacher.calls == [16]
    assert torch.equal(TargetStore(tmp_path).load(), _direct())


def test_missing_store_and_bad_teacher_output(tmp_path) -> None:
    with pytest.raises(TargetStoreError, match=r"no target store at .*meta\.json missing.*teacher_targets"):
        TargetStore(tmp_path / "nothing").load()
    assert not TargetStore(tmp_path / "nothing").is_complete(FINGERPRINT)
    with pytest.raises(ValueError, match=r"must return \(16, num_tokens, dim\) targets \(shard 0\), got \(16, 12\)"):
        TargetStore(tmp_path).compute(FINGERPRINT, NUM_ITEMS, Batches(), lambda x: torch.zeros(16, 12), SHARD, False)
    with pytest.raises(ValueError, match=r"not finite in torch.float16"):
        TargetStore(tmp_path).compute(FINGERPRINT, NUM_ITEMS, Batches(), lambda x: FakeTeacher()(x) * 1e6, SHARD, False)
    assert not list(tmp_path.glob("shard_*.pt"))


def test_fingerprint_hash() -> None:
    assert fingerprint_hash({"a": 1, "b": [1, 2]}) == fingerprint_hash({"b": (1, 2), "a": 1})
    assert fingerprint_hash({"a": 1}) != fingerprint_hash({"a": 1.5})
    assert len(fingerprint_hash(FINGERPRINT)) == 64
    with pytest.raises(TypeError, match="JSON-serialisable"):
        fingerprint_hash({"a": object()})


def test_progress_bar_runs(tmp_path, capsys) -> None:
    TargetStore(tmp_path).compute(FINGERPRINT, NUM_ITEMS, Batches(), FakeTeacher(), shard_size=SHARD, progress=True)
    assert "teacher targets" in capsys.readouterr().err


def test_batch_size_splits_teacher_calls_not_shards(tmp_path) -> None:
    teacher, batches = FakeTeacher(), Batches()
    store = TargetStore(tmp_path)
    store.compute(FINGERPRINT, NUM_ITEMS, batches, teacher, shard_size=SHARD, progress=False, batch_size=6)
    assert teacher.calls == [6, 6, 4] * 3 + [2] and batches.ranges[:3] == [(0, 6), (6, 12), (12, 16)]
    assert len(list(tmp_path.glob("shard_*.pt"))) == 4
    torch.testing.assert_close(store.load().float(), _direct().float(), rtol=1e-3, atol=1e-3)
    teacher = FakeTeacher()  # batch_size is not part of the layout: a complete store is reused as it is
    store.compute(FINGERPRINT, NUM_ITEMS, Batches(), teacher, SHARD, progress=False, batch_size=8)
    assert teacher.calls == []
