"""Kinetics ingestion: annotation CSVs + clip folders of three versions -> the manifests, Kinetics-722, the mapping.

Tiny CSVs and empty placeholder clip files in tmp_path; a fake probe (file name -> info or exception) stands in for
``eva_pipeline.ingest.video.probe_video``, so no video is decoded.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eva_pipeline.ingest.kinetics import (
    KINETICS_ALIASES,
    MANIFEST_COLUMNS,
    REJECTION_COLUMNS,
    ClipLocator,
    VersionSource,
    build_k722,
    k722_class_mapping,
    mapping_arrays,
    probe_clips,
    read_annotations,
    read_class_mapping,
    write_k722,
)

COLUMNS = ["label", "youtube_id", "time_start", "time_end", "split"]


@dataclass(frozen=True)
class Info:
    num_frames: int = 300
    fps: float = 30.0
    width: int = 340
    height: int = 256


class FakeVideoError(ValueError):
    """Like eva_pipeline.ingest.video.VideoError: a ValueError with a ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class FakeProbe:
    """File name -> Info or exception (default: a good 300-frame clip); records every call."""

    def __init__(self, special: dict[str, object] | None = None) -> None:
        self.special = special or {}
        self.calls: list[Path] = []
        self._lock = threading.Lock()

    def __call__(self, path: Path, min_frames: int) -> Info:
        with self._lock:
            self.calls.append(path)
        result = self.special.get(path.name, Info())
        if isinstance(result, BaseException):
            raise result
        return result


def clip(yt: str, start: int) -> str:
    return f"{yt}_{start:06d}_{start + 10:06d}"


def write_csv(path: Path, rows: list[tuple], columns: list[str] = COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


# Eleven-character YouTube ids, one per video.
A, B, C, D, E, F, G, H, Q, J, K, L, M, N = (f"{c * 3}video{c * 3}" for c in "ABCDEFGHQJKLMN")


@pytest.fixture
def world(tmp_path: Path) -> dict:
    """Three versions in three layouts (k400 nested per label, k600 flat per split with a "val" folder and .mkv,
    k700 flat), with a duplicate row, a clip in two versions, an aliased label, a label conflict, leakage into
    another version's and into the own validate split, a missing file, a corrupt and a too short clip."""
    ann, clips = tmp_path / "annotations", tmp_path / "clips"
    k400 = [
        ("abseiling", A, 0, 10, "train"),
        ("changing wheel", B, 10, 20, "train"),
        ("cooking sausages", C, 20, 30, "train"),
        ("dying hair", D, 30, 40, "train"),  # no file
        ("abseiling", E, 40, 50, "train"),  # k700 says zumba
        ("passing American football (not in game)", F, 50, 60, "train"),  # video F in k600 validate
        ("abseiling", A, 0, 10, "train"),  # repeated row
    ]
    write_csv(ann / "k400" / "train.csv", k400)
    write_csv(ann / "k400" / "validate.csv", [("dying hair", G, 0, 10, "validate")])
    write_csv(ann / "k400" / "test.csv", [(H, 0, 10, "test")], ["youtube_id", "time_start", "time_end", "split"])
    for label, yt, start, _, split in k400[:6]:
        if yt != D:
            touch(clips / "k400" / split / label / f"{clip(yt, start)}.mp4")
    touch(clips / "k400" / "validate" / "dying hair" / f"{clip(G, 0)}.mp4")
    touch(clips / "k400" / "test" / f"{clip(H, 0)}.mp4")

    k600_train = [("eating nachos", Q, 0, 10, "train"), ("passing american football (not in game)", J, 0, 10, "train")]
    k600_val = [("passing american football (not in game)", F, 60, 70, "val"), ("abseiling", K, 0, 10, "val")]
    write_csv(ann / "k600" / "train.csv", k600_train)
    write_csv(ann / "k600" / "val.csv", k600_val)  # K400-style "val" file name and split value
    for _, yt, start, _, _ in k600_train:
        touch(clips / "k600" / "train" / f"{clip(yt, start)}.mp4")
    for _, yt, start, _, _ in k600_val:
        touch(clips / "k600" / "val" / f"{clip(yt, start)}.mkv")

    k700_train = [
        ("abseiling", A, 0, 10, "train"),
        ("changing wheel (not on bike)", B, 10, 20, "train"),
        ("zumba", E, 40, 50, "train"),
        ("cooking sausages (not on barbeque)", L, 0, 10, "train"),  # too short
        ("eating nachos", M, 0, 10, "train"),  # video M in k700 validate
    ]
    k700_val = [
        ("abseiling", K, 0, 10, "validate"),
        ("eating nachos", M, 20, 30, "validate"),
        ("zumba", N, 0, 10, "validate"),
    ]
    write_csv(ann / "k700" / "train.csv", k700_train)
    write_csv(ann / "k700" / "validate.csv", k700_val)
    for _, yt, start, _, _ in k700_train + k700_val:
        touch(clips / "k700" / f"{clip(yt, start)}.mp4")

    versions = [VersionSource.from_folder(v, ann / v, clips / v) for v in ("k400", "k600", "k700")]
    special = {
        f"{clip(J, 0)}.mp4": FakeVideoError("corrupt", "decoding failed at frame 7"),
        f"{clip(L, 0)}.mp4": Info(num_frames=3),
    }
    return {"versions": versions, "special": special, "root": tmp_path, "ann": ann, "clips": clips}


def build(world: dict, **kwargs):
    probe = FakeProbe(world["special"])
    kwargs.setdefault("min_frames", 8)
    kwargs.setdefault("workers", 1)
    return build_k722(world["versions"], probe, relative_to=world["root"], **kwargs), probe


def rows_of(manifest: pd.DataFrame, dataset: str, split: str) -> pd.DataFrame:
    return manifest[(manifest["dataset"] == dataset) & (manifest["split"] == split)].set_index("clip_id")


# ------------------------------------------------------------------------------------------------ class mapping
def test_default_aliases_are_the_k700_spellings() -> None:
    assert dict(KINETICS_ALIASES) == {
        "changing wheel": "changing wheel (not on bike)",
        "cooking sausages": "cooking sausages (not on barbeque)",
        "passing american football (not in game)": "passing American football (not in game)",
    }


def test_alias_merges_a_k400_name_with_its_k700_rename() -> None:
    classes = {"k400": ["changing wheel", "abseiling"], "k700": ["changing wheel (not on bike)", "abseiling", "zumba"]}
    merged = k722_class_mapping(classes)
    assert merged["k722_classes"] == ["abseiling", "changing wheel (not on bike)", "zumba"]
    assert merged["versions"]["k400"] == {"classes": ["abseiling", "changing wheel"], "k722_index": [0, 1]}
    assert merged["versions"]["k700"]["k722_index"] == [0, 1, 2]
    # Without the alias the two spellings are two classes.
    assert len(k722_class_mapping(classes, aliases={})["k722_classes"]) == 4


def test_alias_table_is_a_parameter_and_is_checked() -> None:
    merged = k722_class_mapping({"a": ["x", "y"], "b": ["z"]}, aliases={"x": "z"})
    assert merged["k722_classes"] == ["y", "z"] and merged["aliases"] == {"x": "z"}
    with pytest.raises(ValueError, match="chain"):
        k722_class_mapping({"a": ["x"]}, aliases={"x": "y", "y": "z"})
    with pytest.raises(ValueError, match=r"'k400' has both 'changing wheel' and 'changing wheel \(not on bike\)'"):
        k722_class_mapping({"k400": ["changing wheel", "changing wheel (not on bike)"]})


def test_mapping_indexes_k722_logits_into_each_versions_class_order(world: dict) -> None:
    result, _ = build(world)
    mapping = result.mapping
    k722 = mapping["k722_classes"]
    assert k722 == sorted(k722) and len(k722) == 7  # 10 names, 3 of them renames
    assert "changing wheel" not in k722 and "cooking sausages (not on barbeque)" in k722
    rng = np.random.default_rng(np.random.SeedSequence([0]))
    logits = rng.normal(size=(4, len(k722)))
    for version, index in mapping_arrays(mapping).items():
        classes = mapping["versions"][version]["classes"]
        assert classes == sorted(classes)  # the official label maps' order
        # Column j of the indexed logits is the K722 logit of the version's j-th class, found by name.
        by_name = np.stack([logits[:, k722.index(KINETICS_ALIASES.get(c, c))] for c in classes], axis=1)
        assert np.array_equal(logits[:, index], by_name)
    assert mapping["versions"]["k600"]["classes"] == [
        "abseiling",
        "eating nachos",
        "passing american football (not in game)",
    ]
    # The version datasets' labels are indices into their own class lists, K722's into K722's.
    for dataset, classes in [("k722", k722)] + [(v, m["classes"]) for v, m in mapping["versions"].items()]:
        labelled = result.manifest[(result.manifest["dataset"] == dataset) & (result.manifest["label"] >= 0)]
        assert [classes[i] for i in labelled["label"]] == labelled["label_name"].tolist()


def test_mapping_json_round_trip_and_check(tmp_path: Path, world: dict) -> None:
    result, _ = build(world)
    paths = write_k722(result, tmp_path / "out")
    saved = json.loads(paths["mapping"].read_text(encoding="utf-8"))
    assert saved == result.mapping and set(saved) == {"k722_classes", "versions", "aliases"}
    assert read_class_mapping(paths["mapping"]) == result.mapping
    assert pd.read_parquet(paths["manifest"]).shape == result.manifest.shape
    assert json.loads(paths["report"].read_text(encoding="utf-8")) == result.report
    saved["versions"]["k400"]["k722_index"][0] += 1
    paths["mapping"].write_text(json.dumps(saved), encoding="utf-8")
    with pytest.raises(ValueError, match="mismatched"):
        read_class_mapping(paths["mapping"])


# ------------------------------------------------------------------------------------------------ the build
def test_k722_train_dedup_conflict_leakage_and_rejections(world: dict) -> None:
    result, _ = build(world)
    train = rows_of(result.manifest, "k722", "train")
    # A (k400 + k700) and B (k400 "changing wheel" + k700 renamed) are one clip each, from the first version.
    assert sorted(train.index) == sorted([clip(A, 0), clip(B, 10), clip(C, 20), clip(Q, 0)])
    assert train.loc[clip(A, 0), "source"] == "k400" and train.loc[clip(Q, 0), "source"] == "k600"
    assert train.loc[clip(B, 10), "label_name"] == "changing wheel (not on bike)"
    assert train.loc[clip(A, 0), "path"] == f"clips/k400/train/abseiling/{clip(A, 0)}.mp4"
    assert train.loc[clip(A, 0), ["num_frames", "width", "height"]].tolist() == [300, 340, 256]
    k722 = result.report["k722"]["train"]
    assert k722 == {
        "candidates": 10,
        "conflicts": 1,
        "leakage_removed": 2,
        "leakage_by_version": {"k400": 0, "k600": 1, "k700": 1},
        "rejected": 3,
        "kept": 4,
    }
    rejected = result.rejections[result.rejections["dataset"] == "k722"].set_index("clip_id")
    conflict = rejected.loc[clip(E, 40)]
    assert conflict["reason"] == "label_conflict" and "k400: 'abseiling'" in conflict["detail"]
    assert "k700: 'zumba'" in conflict["detail"]
    assert rejected.loc[clip(F, 50), "reason"] == "leakage" and rejected.loc[clip(F, 50), "detail"].endswith("k600")
    assert rejected.loc[clip(M, 0), "reason"] == "leakage"
    assert rejected.loc[clip(D, 30), "reason"] == "missing_file"
    assert rejected.loc[clip(J, 0), "reason"] == "corrupt" and rejected.loc[clip(L, 0), "reason"] == "too_short"
    # No K722 training video is in any held-out split.
    held_out = result.manifest[result.manifest["split"].isin(["validate", "test"])]
    assert not set(train["youtube_id"]) & set(held_out["youtube_id"])
    # The versions keep their own clips: k400 still trains on E (abseiling) and F (leaks only into k600).
    k400 = rows_of(result.manifest, "k400", "train")
    assert sorted(k400.index) == sorted([clip(A, 0), clip(B, 10), clip(C, 20), clip(E, 40), clip(F, 50)])
    assert k400.loc[clip(B, 10), "label_name"] == "changing wheel"


def test_leakage_counts_listed_held_out_videos_even_without_their_files(world: dict) -> None:
    (world["clips"] / "k600" / "val" / f"{clip(F, 60)}.mkv").unlink()
    result, _ = build(world)
    assert clip(F, 50) not in rows_of(result.manifest, "k722", "train").index
    assert result.report["k722"]["train"]["leakage_by_version"]["k600"] == 1
    rejected = result.rejections.set_index(["dataset", "clip_id"])
    assert rejected.loc[("k600", clip(F, 60)), "reason"] == "missing_file"
    assert rejected.loc[("k722", clip(F, 50)), "reason"] == "leakage"


def test_k722_validate_is_the_deduplicated_union(world: dict) -> None:
    result, _ = build(world)
    validate = rows_of(result.manifest, "k722", "validate")
    assert sorted(validate.index) == sorted([clip(G, 0), clip(F, 60), clip(K, 0), clip(M, 20), clip(N, 0)])
    assert validate.loc[clip(K, 0), "source"] == "k600"  # in k600 and k700: one clip
    assert validate.loc[clip(F, 60), "label_name"] == "passing American football (not in game)"  # aliased
    assert result.report["k722"]["validate"] == {"candidates": 5, "conflicts": 0, "rejected": 0, "kept": 5}
    assert not (result.manifest["dataset"].eq("k722") & result.manifest["split"].eq("test")).any()


def test_validate_label_conflict_is_dropped_and_reported(world: dict) -> None:
    write_csv(world["ann"] / "k700" / "validate.csv", [("zumba", K, 0, 10, "validate")])
    result, _ = build(world)
    assert clip(K, 0) not in rows_of(result.manifest, "k722", "validate").index
    assert clip(K, 0) in rows_of(result.manifest, "k700", "validate").index
    rejected = result.rejections.set_index(["dataset", "clip_id"]).loc[("k722", clip(K, 0))]
    assert rejected["reason"] == "label_conflict" and rejected["split"] == "validate"
    assert rejected["detail"] == "labels differ: k600: 'abseiling'; k700: 'zumba'"
    assert result.report["k722"]["validate"]["conflicts"] == 1
    assert result.report["versions"]["k600"]["k722_conflicts"] == {"train": 0, "validate": 1}


def test_version_reports_add_up(world: dict) -> None:
    result, _ = build(world)
    versions = result.report["versions"]
    expected = {
        "k400": {
            "clips_listed": 9,
            "duplicates": 1,
            "conflicts": 0,
            "leakage_removed": 0,
            "missing_files": 1,
            "kept": 7,
        },
        "k600": {
            "clips_listed": 4,
            "duplicates": 0,
            "conflicts": 0,
            "leakage_removed": 0,
            "missing_files": 0,
            "kept": 3,
        },
        "k700": {
            "clips_listed": 8,
            "duplicates": 0,
            "conflicts": 0,
            "leakage_removed": 1,
            "missing_files": 0,
            "kept": 6,
        },
    }
    for name, counts in expected.items():
        report = versions[name]
        assert {k: report[k] for k in counts} == counts
        parts = ("duplicates", "conflicts", "leakage_removed", "missing_files")
        assert (
            report["clips_listed"]
            == sum(report[k] for k in parts) + sum(report["unreadable"].values()) + report["kept"]
        )
        assert report["found"] == sum(report["unreadable"].values()) + report["kept"]
        assert sum(report["kept_by_split"].values()) == report["kept"]
        assert report["kept"] == int((result.manifest["dataset"] == name).sum())
    assert versions["k600"]["unreadable"] == {"corrupt": 1} and versions["k700"]["unreadable"] == {"too_short": 1}
    assert versions["k400"]["k722_leakage_removed"] == 1 and versions["k700"]["k722_leakage_removed"] == 1
    assert versions["k400"]["classes"] == 5 and result.report["k722"]["classes"] == 7
    k722 = result.report["k722"]["train"]
    assert k722["candidates"] == k722["conflicts"] + k722["leakage_removed"] + k722["rejected"] + k722["kept"]


def test_each_clip_file_is_probed_once(world: dict) -> None:
    result, probe = build(world, workers=4)
    assert len(probe.calls) == len(set(probe.calls)) == 18  # 7 + 4 + 7 files to probe, A and B twice on disk
    assert not any(clip(D, 30) in p.name or clip(M, 0) in p.name for p in probe.calls)  # missing / leaked
    assert len(result.manifest) == 7 + 3 + 6 + 4 + 5


def test_missing_file_is_rejected_and_listed(world: dict) -> None:
    result, _ = build(world)
    row = result.rejections.set_index(["dataset", "clip_id"]).loc[("k400", clip(D, 30))]
    assert row["reason"] == "missing_file" and row["split"] == "train"
    assert row["path"] == f"clips/k400/train/dying hair/{clip(D, 30)}.mp4"
    assert f"no {clip(D, 30)}.{{mp4,mkv,webm,avi}}" in row["detail"] and "train/dying hair" in row["detail"]
    assert clip(D, 30) not in set(result.manifest["clip_id"])


def test_a_copy_in_another_version_is_used_and_the_bad_one_listed(world: dict) -> None:
    (world["clips"] / "k400" / "train" / "abseiling" / f"{clip(A, 0)}.mp4").unlink()
    result, _ = build(world)
    assert rows_of(result.manifest, "k722", "train").loc[clip(A, 0), "source"] == "k700"
    assert clip(A, 0) not in rows_of(result.manifest, "k400", "train").index
    listed = result.rejections[result.rejections["clip_id"] == clip(A, 0)]
    assert listed[["dataset", "reason"]].values.tolist() == [["k400", "missing_file"]]


def test_probe_error_reasons_are_recorded(world: dict) -> None:
    class Opaque(OSError):
        def __repr__(self) -> str:
            return f"<Opaque at {hex(id(self))}>"

    special = {
        f"{clip(C, 20)}.mp4": OSError(5, "Input/output error"),
        f"{clip(Q, 0)}.mp4": FakeVideoError("no_video_stream", "only an audio stream"),
        f"{clip(B, 10)}.mp4": Opaque(f"object at {hex(id(world))} failed"),
    }
    world["special"].update(special)
    result, _ = build(world)
    rejected = result.rejections.set_index(["dataset", "clip_id"])
    assert rejected.loc[("k400", clip(C, 20)), "reason"] == "unreadable"
    assert rejected.loc[("k400", clip(C, 20)), "detail"] == "OSError: [Errno 5] Input/output error"
    assert rejected.loc[("k600", clip(Q, 0)), "reason"] == "no_video_stream"
    assert rejected.loc[("k600", clip(J, 0)), "detail"] == "FakeVideoError: decoding failed at frame 7"
    assert rejected.loc[("k700", clip(L, 0)), "detail"] == "3 frame(s), fewer than min_frames=8"
    assert not result.rejections["detail"].str.contains("0x").any()
    assert result.report["versions"]["k600"]["unreadable"] == {"corrupt": 1, "no_video_stream": 1}


def test_a_bug_in_the_probe_is_not_taken_for_a_bad_clip(world: dict) -> None:
    world["special"][f"{clip(C, 20)}.mp4"] = TypeError("probe bug")
    with pytest.raises(TypeError, match="probe bug"):
        build(world)


def test_deterministic_with_any_number_of_workers(world: dict) -> None:
    one, _ = build(world, workers=1)
    four, _ = build(world, workers=4)
    pd.testing.assert_frame_equal(one.manifest, four.manifest)
    pd.testing.assert_frame_equal(one.rejections, four.rejections)
    assert one.report == four.report and one.mapping == four.mapping
    assert list(one.manifest.columns) == list(MANIFEST_COLUMNS)
    assert list(one.rejections.columns) == list(REJECTION_COLUMNS)
    order = one.manifest[["dataset", "split", "clip_id"]].values.tolist()
    rank = {"k722": 0, "k400": 1, "k600": 2, "k700": 3}
    splits = {"train": 0, "validate": 1, "test": 2}
    assert order == sorted(order, key=lambda r: (rank[r[0]], splits[r[1]], r[2]))


def test_probe_results_keep_the_input_order_under_threads(tmp_path: Path) -> None:
    paths = [tmp_path / f"c{i}.mp4" for i in range(12)]

    def slow_first(path: Path, min_frames: int) -> Info:  # the first paths finish last
        k = int(path.stem[1:])
        time.sleep(0.002 * (12 - k))
        return Info(num_frames=k + 1)

    results = probe_clips(paths, slow_first, min_frames=1, workers=4)
    assert [r.num_frames for r in results] == list(range(1, 13)) and all(r.reason == "" for r in results)


def test_paths_outside_the_given_root_stay_absolute(world: dict) -> None:
    result = build_k722(world["versions"], FakeProbe(world["special"]), relative_to=world["ann"])
    paths = result.manifest["path"].tolist()
    assert paths and all(os.path.isabs(p) and os.path.isfile(p) for p in paths)


def test_unlabelled_test_csv_is_accepted(world: dict) -> None:
    result, _ = build(world)
    test = rows_of(result.manifest, "k400", "test")
    assert test.index.tolist() == [clip(H, 0)]
    assert test["label"].tolist() == [-1] and test["label_name"].isna().all()
    assert test.loc[clip(H, 0), "path"] == f"clips/k400/test/{clip(H, 0)}.mp4"


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_columns_name_the_file_and_the_columns(world: dict, tmp_path: Path) -> None:
    bad = write_csv(
        world["ann"] / "k600" / "train.csv", [("eating nachos", Q, 0)], ["label", "youtube_id", "time_start"]
    )
    probe = FakeProbe()
    with pytest.raises(ValueError, match="missing column") as info:
        build_k722(world["versions"], probe)
    assert str(bad) in str(info.value) and "['time_end', 'split']" in str(info.value)
    assert probe.calls == []  # failed before any clip was probed
    # Only a test split may lack the label column.
    write_csv(bad, [(Q, 0, 10, "train")], ["youtube_id", "time_start", "time_end", "split"])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['label'\]"):
        read_annotations(bad, "train")


def test_unknown_or_mismatched_split_values_are_errors(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "train.csv", [("a", A, 0, 10, "train"), ("a", B, 0, 10, "training")])
    with pytest.raises(ValueError, match=r"'training'.*line.*3"):
        read_annotations(path, "train")
    path = write_csv(tmp_path / "val.csv", [("a", A, 0, 10, "train")])
    with pytest.raises(ValueError, match="given as the validate CSV"):
        read_annotations(path, "val")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        read_annotations(path, "dev")


def test_bad_rows_are_errors_naming_the_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "train.csv", [("a", A, 0, 10, "train"), ("", B, 0, 10, "train")])
    with pytest.raises(ValueError, match=r"1 row\(s\) without label \(lines \[3\]\)"):
        read_annotations(path, "train")
    path = write_csv(tmp_path / "train.csv", [("a", A, "x", 10, "train")])
    with pytest.raises(ValueError, match=r"'time_start' must hold whole non-negative seconds.*line 2: 'x'"):
        read_annotations(path, "train")


def test_annotations_parse_and_clip_ids(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "val.csv", [(" abseiling ", A, 5, 15, "val", 1), ("zumba", B, "7.0", 17, "validate", 0)],
        [*COLUMNS, "is_cc"],
    )  # fmt: skip
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a byte-order mark, as spreadsheet exports write
    table = read_annotations(path, "validate")
    assert table["clip_id"].tolist() == [f"{A}_000005_000015", f"{B}_000007_000017"]
    assert table["label"].tolist() == ["abseiling", "zumba"] and set(table["split"]) == {"validate"}
    assert table["time_start"].tolist() == [5, 7] and table["time_start"].dtype == np.int64


def test_label_outside_a_given_class_list_is_an_error(world: dict) -> None:
    source = world["versions"][1]
    classes = ["abseiling", "eating nachos"]  # lacks k600's football class
    versions = [VersionSource(source.name, source.csvs, source.clip_root, classes)]
    with pytest.raises(ValueError, match=r"'k600': 1 CSV label\(s\) not in its class list"):
        build_k722(versions, FakeProbe())
    full = [*classes, "passing american football (not in game)", "zumba"]  # zumba: a class without clips
    result = build_k722([VersionSource(source.name, source.csvs, source.clip_root, full)], FakeProbe())
    assert result.mapping["versions"]["k600"]["classes"] == sorted(full)


def test_version_names_and_clip_root_are_checked(world: dict, tmp_path: Path) -> None:
    v = world["versions"][0]
    with pytest.raises(ValueError, match="distinct"):
        build_k722([v, v], FakeProbe())
    with pytest.raises(FileNotFoundError, match="clip root"):
        build_k722([VersionSource("k400", v.csvs, tmp_path / "nowhere")], FakeProbe())
    with pytest.raises(FileNotFoundError, match="no annotation CSV"):
        VersionSource.from_folder("k400", tmp_path / "empty", tmp_path)


# ------------------------------------------------------------------------------------------------ layouts
def test_layout_resolution_nested_flat_and_preferences(tmp_path: Path) -> None:
    root = tmp_path / "k700"
    nested = touch(root / "train" / "air drumming" / "n1.mp4")
    underscored = touch(root / "train" / "playing_guitar" / "n2.webm")
    per_split = touch(root / "val" / "n3.avi")
    flat = touch(root / "n4.mkv")
    touch(root / "train" / "both.mkv")
    both = touch(root / "train" / "both.mp4")  # .mp4 preferred over .mkv
    touch(root / "n1.mp4")  # the nested copy wins over the flat one
    touch(root / "train" / "air drumming" / "n5.txt")  # not a video
    locator = ClipLocator(root)
    assert locator.locate("n1", "train", "air drumming") == str(nested)
    assert locator.locate("n2", "train", "playing guitar") == str(underscored)
    assert locator.locate("n3", "validate", "zumba") == str(per_split)
    assert locator.locate("n4", "test", "") == str(flat)
    assert locator.locate("both", "train", "air drumming") == str(both)
    assert locator.locate("n5", "train", "air drumming") is None
    assert locator.locate("n3", "train", "zumba") is None  # a validate file is not a train clip
    assert locator.folders("validate", "a b")[:2] == ("validate/a b", "validate/a_b")
    assert locator.folders("train", "x")[-3:] == ("train", "videos_train", "")


def test_layout_folders_are_listed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import eva_pipeline.ingest.kinetics as kinetics

    root = tmp_path / "k400"
    for k in range(20):
        touch(root / "train" / "abseiling" / f"c{k}.mp4")
    listed: list[str] = []
    real = kinetics.os.scandir

    def counting(path):
        listed.append(Path(path).relative_to(root).as_posix())
        return real(path)

    monkeypatch.setattr(kinetics.os, "scandir", counting)
    locator = ClipLocator(root)
    assert all(locator.locate(f"c{k}", "train", "abseiling") is not None for k in range(20))
    assert listed == ["train/abseiling"]
