"""Moving Fashion-MNIST: the class tables, the Kinetics layout and its overlaps and leaks, determinism, and that the
motions move the item the right way while a single frame does not give the motion away."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from eva_pipeline.ingest import moving_fashion_mnist as mfm
from eva_pipeline.ingest.readers.idx import read_idx
from eva_pipeline.ingest.video import decode_frames, decoded_digest

SMALL = {"train_per_class": 2, "validate_per_class": 2, "train_shift": 1, "leaks_per_class": 1}


@pytest.fixture(scope="module")
def arrays(fmnist) -> tuple[np.ndarray, ...]:
    return tuple(
        read_idx(p) for p in (fmnist.train_images, fmnist.train_labels, fmnist.test_images, fmnist.test_labels)
    )


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, arrays) -> tuple[Path, dict]:
    """A small generated set (2 train + 2 validate clips per class and version, 168 clips, ~1 s)."""
    out = tmp_path_factory.mktemp("mfm") / "moving_fashion_mnist"
    return out, mfm.generate(out, *arrays, seed=3, **SMALL)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def clip_keys(out: Path, version: str, split: str) -> dict[tuple[str, str, str], str]:
    """(youtube_id, time_start, time_end) -> label of one CSV."""
    rows = read_csv(out / version / "annotations" / f"{split}.csv")
    return {(r["youtube_id"], r["time_start"], r["time_end"]): r["label"] for r in rows}


# --------------------------------------------------------------------------------------------------- class tables
def test_versions_nest_with_one_alias() -> None:
    assert len(mfm.MOTIONS) == 8 and sum(len(c) for c in mfm.GROUPS.values()) == 10
    assert sorted(c for cs in mfm.GROUPS.values() for c in cs) == list(range(10))
    v400, v600, v700 = (mfm.VERSIONS[v] for v in ("v400", "v600", "v700"))
    assert (len(v400), len(v600), len(v700)) == (16, 20, 24)
    assert set(v400) < set(v600) and len(set(v700)) == 24
    ((old, new),) = mfm.ALIASES.items()
    assert old in v400 and old in v600 and old not in v700 and new in v700 and new not in v600
    assert {mfm.ALIASES.get(n, n) for n in v600} < set(v700)  # through the alias, v600 is inside v700
    assert len(set(v400) | set(v600) | set(v700)) == 25  # a naive union counts the renamed class twice


def test_mirror_class() -> None:
    assert mfm.mirror_class("tops moving left") == "tops moving right"
    assert mfm.mirror_class("footwear zooming out") == "footwear zooming in"
    assert mfm.mirror_class("other moving down") == "other moving up"
    assert mfm.mirror_class("tops going round clockwise") == "tops circling anticlockwise"  # the old name
    assert mfm.mirror_class("tops circling anticlockwise", "v400") == "tops going round clockwise"
    assert mfm.mirror_class("tops circling anticlockwise", "v700") == "tops circling clockwise"
    assert mfm.mirror_class("other zooming in", "v600") is None and mfm.mirror_class("dancing") is None
    for version, names in mfm.VERSIONS.items():  # every version holds whole mirror pairs
        assert {mfm.mirror_class(n, version) for n in names} == set(names)


# ------------------------------------------------------------------------------------------------------- the set
def test_layout_and_csvs(small_set) -> None:
    out, summary = small_set
    expected_files = {"checksums.json", "sources.csv"}
    for version, names in mfm.VERSIONS.items():
        for split in mfm.SPLITS:
            path = out / version / "annotations" / f"{split}.csv"
            assert path.read_text().splitlines()[0] == "label,youtube_id,time_start,time_end,split"
            rows = read_csv(path)
            assert {r["split"] for r in rows} == {split} and {r["label"] for r in rows} == set(names)
            for r in rows:
                assert re.fullmatch(r"[A-Za-z0-9_-]{11}", r["youtube_id"])
                assert int(r["time_end"]) - int(r["time_start"]) == 2  # 16 frames at 8 fps
                stem = f"{r['youtube_id']}_{int(r['time_start']):06d}_{int(r['time_end']):06d}"
                name = f"{version}/{split}/{r['label']}/{stem}.mp4"
                assert (out / name).is_file(), name
                expected_files.add(name)
            expected_files.add(f"{version}/annotations/{split}.csv")
            assert summary["versions"][version]["clips"][split] == len(rows)
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == expected_files
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary folder left beside it
    # Per class: 2 train (+1 leaked clip where the class existed in an earlier version), 2 validate.
    assert {v: s["clips"] for v, s in summary["versions"].items()} == {
        "v400": {"train": 32, "validate": 32},
        "v600": {"train": 16 * 3 + 4 * 2, "validate": 40},
        "v700": {"train": 20 * 3 + 4 * 2, "validate": 48},
    }


def test_overlap_and_deliberate_leakage(small_set) -> None:
    out, summary = small_set
    train = {v: clip_keys(out, v, "train") for v in mfm.VERSIONS}
    val = {v: clip_keys(out, v, "validate") for v in mfm.VERSIONS}
    # Shared clips: per class, train windows of 2 shifted by 1 share 1 clip with the next version, as do the
    # validate windows; the same clip keeps its label (through the alias).
    assert len(train["v400"].keys() & train["v600"].keys()) == 16
    assert len(train["v600"].keys() & train["v700"].keys()) == 20
    assert len(val["v400"].keys() & val["v600"].keys()) == 16
    labels = {v: train[v] | val[v] for v in mfm.VERSIONS}
    renamed = 0
    for a, b in (("v400", "v600"), ("v400", "v700"), ("v600", "v700")):
        for key in labels[a].keys() & labels[b].keys():
            assert mfm.ALIASES.get(labels[a][key], labels[a][key]) == mfm.ALIASES.get(labels[b][key], labels[b][key])
            renamed += labels[a][key] != labels[b][key]
    assert renamed >= 2  # old name in v400 / v600, new name in v700
    # Deliberate leaks: one clip per class of the previous version is validate there and train here.
    for version in mfm.VERSIONS:
        assert not train[version].keys() & val[version].keys()  # never within a version
    assert len(train["v600"].keys() & val["v400"].keys()) == 16
    assert len(train["v700"].keys() & (val["v400"].keys() | val["v600"].keys())) == 20
    assert {v: s["train_clips_in_some_validation"] for v, s in summary["versions"].items()} == {
        "v400": 0,
        "v600": 16,
        "v700": 20,
    }


def test_sources_train_and_test_images_and_content(small_set, arrays) -> None:
    """Validate clips render t10k images, train clips train images (but the leaks); sources.csv tells the truth."""
    out, _ = small_set
    train_images, train_labels, test_images, test_labels = arrays
    sources = {(r["youtube_id"], r["time_start"], r["time_end"]): r for r in read_csv(out / "sources.csv")}
    leaked = set()
    for version in mfm.VERSIONS:
        val = clip_keys(out, version, "validate")
        assert {sources[k]["source"] for k in val} == {"test"}
        leaked |= val.keys()
        for key, label in clip_keys(out, version, "train").items():
            assert sources[key]["source"] == ("test" if key in leaked else "train")
            group, motion = sources[key]["group"], sources[key]["motion"]
            assert mfm.ALIASES.get(label, label) == mfm.class_name(group, motion)
            assert int(sources[key]["fashion_label"]) in mfm.GROUPS[group]
    for source, labels in (("train", train_labels), ("test", test_labels)):
        rows = [r for r in sources.values() if r["source"] == source]
        assert all(labels[int(r["image_index"])] == int(r["fashion_label"]) for r in rows)
        assert len({r["image_index"] for r in rows}) == len(rows)  # no image used twice
    # A file decodes to the rendering of the image sources.csv names.
    row = next(r for r in sources.values() if r["source"] == "test" and r["motion"] == "zoom_in")
    clip = mfm.Clip("test", int(row["image_index"]), int(row["fashion_label"]), row["group"], row["motion"],
                    row["youtube_id"], int(row["time_start"]), int(row["time_end"]))  # fmt: skip
    path = next(out.glob(f"*/validate/*/{clip.stem}.mp4"))
    expected = mfm.render_clip(test_images[clip.image_index], clip.motion, mfm.clip_rng(3, clip))
    decoded = decode_frames(path, range(16))[..., 0].astype(np.int16)
    assert np.abs(decoded - expected).mean() < 1.5
    other_image = mfm.render_clip(train_images[clip.image_index], clip.motion, mfm.clip_rng(3, clip))
    assert np.abs(decoded - other_image).mean() > 5


def test_checksums_cover_every_file(small_set) -> None:
    out, _ = small_set
    record = json.loads((out / "checksums.json").read_text())
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"checksums.json"}
    assert set(record["files"]) == files and record["params"]["seed"] == 3
    for name in sorted(files)[:40]:
        assert record["files"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    clips = sorted(out.glob("v700/validate/*/*.mp4"))[:5]
    assert all(record["decoded_frames"][p.stem] == decoded_digest(p) for p in clips)
    assert len(record["decoded_frames"]) == len({p.stem for p in out.rglob("*.mp4")})


def test_generation_is_deterministic_and_replaces_atomically(small_set, arrays, tmp_path, monkeypatch) -> None:
    out, _ = small_set
    again = tmp_path / "again"
    again.mkdir()
    (again / "stale.txt").write_text("from an older run")
    mfm.generate(again, *arrays, seed=3, **SMALL)  # over an existing folder
    assert (again / "checksums.json").read_bytes() == (out / "checksums.json").read_bytes()
    assert not (again / "stale.txt").exists() and [p.name for p in tmp_path.iterdir()] == ["again"]
    other_seed = mfm.generate(tmp_path / "seed4", *arrays, seed=4, **SMALL)
    assert other_seed["unique_clips"] == 168
    assert (tmp_path / "seed4" / "checksums.json").read_bytes() != (out / "checksums.json").read_bytes()

    calls = []

    def failing_encode(path, frames, **kwargs):
        calls.append(path)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return real_encode(path, frames, **kwargs)

    real_encode = mfm.encode_video
    monkeypatch.setattr(mfm, "encode_video", failing_encode)
    with pytest.raises(RuntimeError, match="disk full"):
        mfm.generate(again, *arrays, seed=5, **SMALL)
    assert (again / "checksums.json").read_bytes() == (out / "checksums.json").read_bytes()  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "seed4"]  # the temporary folder is gone


def test_bad_inputs(arrays, tmp_path) -> None:
    train_images, train_labels, test_images, test_labels = arrays
    with pytest.raises(ValueError, match=r"the test images hold \d+ of group 'tops' .* 32 needed"):
        mfm.generate(tmp_path / "x", train_images, train_labels, test_images[:60], test_labels[:60], **SMALL)
    with pytest.raises(ValueError, match="labels must be integers of shape"):
        mfm.generate(tmp_path / "x", train_images, train_labels[:-1], test_images, test_labels, **SMALL)
    with pytest.raises(ValueError, match="item_size 20 must be"):
        mfm.generate(tmp_path / "x", *arrays, item_size=20, **SMALL)
    with pytest.raises(ValueError, match="size must be even"):
        mfm.generate(tmp_path / "x", *arrays, size=27, item_size=10, **SMALL)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- the motions
def circular_centre(frames: np.ndarray) -> np.ndarray:
    """(T, 2) intensity centre (y, x) of each frame on the torus (a circular mean per axis), in pixels."""
    size = frames.shape[-1]
    phase = np.exp(2j * np.pi * (np.arange(size) + 0.5) / size)
    weights = frames.astype(np.float64)
    y = np.angle((weights.sum(axis=2) * phase).sum(axis=1))
    x = np.angle((weights.sum(axis=1) * phase).sum(axis=1))
    return np.mod(np.stack([y, x], axis=1) * size / (2 * np.pi), size)


def wrapped_steps(centres: np.ndarray, size: int = 28) -> np.ndarray:
    return np.mod(np.diff(centres, axis=0) + size / 2, size) - size / 2


@pytest.fixture(scope="module")
def rendered(arrays) -> dict[str, list[np.ndarray]]:
    """120 clips per motion (render only, no encoding), images and jitter differing per clip."""
    images = arrays[0]
    return {
        motion: [mfm.render_clip(images[i], motion, np.random.default_rng([i, m])) for i in range(120)]
        for m, motion in enumerate(mfm.MOTIONS)
    }


def test_translations_move_the_item_the_right_way(rendered) -> None:
    directions = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
    for motion, (dy, dx) in directions.items():
        for clip in rendered[motion]:
            total = wrapped_steps(circular_centre(clip)).sum(axis=0)
            along, across = (total[1] * dx, total[0]) if dx else (total[0] * dy, total[1])
            assert 0.3 * 28 - 1 < along < 0.5 * 28 + 1 and abs(across) < 1, (motion, total)


def test_orbits_turn_the_right_way_and_zooms_scale(rendered) -> None:
    for motion, sign in (("clockwise", 1), ("anticlockwise", -1)):
        for clip in rendered[motion]:
            steps = wrapped_steps(circular_centre(clip))  # (dy, dx); y points down, so clockwise turns positive
            turning = steps[:-1, 1] * steps[1:, 0] - steps[:-1, 0] * steps[1:, 1]
            assert sign * turning.sum() > 0 and np.abs(steps).sum() > 5
    for motion, sign in (("zoom_in", 1), ("zoom_out", -1)):
        for clip in rendered[motion]:
            mass = clip.reshape(16, -1).astype(np.float64).sum(axis=1)
            assert sign * (mass[-1] - mass[0]) > 0.5 * min(mass[0], mass[-1])  # area x 1.3^2 .. 1.45^2
            assert np.all(sign * np.diff(mass) > -0.02 * mass[:-1])  # monotone up to resampling noise
            assert np.abs(wrapped_steps(circular_centre(clip))).max() < 0.5  # stays in place


def best_threshold_accuracy(a: np.ndarray, b: np.ndarray) -> float:
    """Accuracy of the best single threshold telling samples ``a`` from ``b`` (0.5 = no information)."""
    values, truth = np.concatenate([a, b]), np.r_[np.zeros(len(a)), np.ones(len(b))]
    accuracies = [((values > t) == truth).mean() for t in np.unique(values)]
    return max(0.5, *accuracies, *(1 - np.asarray(accuracies)))


def test_a_single_frame_does_not_give_the_motion_away(rendered) -> None:
    """Position on the torus says nothing about the motion; only a zoom's first-frame size says something (the
    module docstring's ~70 %), its middle frame nothing. 120 clips each: noise alone reaches ~0.6."""

    def feature(motion: str, frame: int, which: str) -> np.ndarray:
        clips = rendered[motion]
        if which == "mass":
            return np.array([c[frame].astype(np.float64).sum() for c in clips])
        return np.array([circular_centre(c[frame : frame + 1])[0, "yx".index(which)] for c in clips])

    for a, b in mfm.MIRROR_PAIRS[:3]:
        for which in ("y", "x", "mass"):
            assert best_threshold_accuracy(feature(a, 0, which), feature(b, 0, which)) < 0.63, (a, b, which)
    assert best_threshold_accuracy(feature("zoom_in", 0, "mass"), feature("zoom_out", 0, "mass")) > 0.63
    assert best_threshold_accuracy(feature("zoom_in", 0, "x"), feature("zoom_out", 0, "x")) < 0.63
    middle = [
        np.array([np.sqrt(c[7].astype(np.float64).sum() * c[8].sum()) for c in rendered[m]])
        for m in ("zoom_in", "zoom_out")
    ]
    assert best_threshold_accuracy(*middle) < 0.63


def test_rendering_is_exact_and_repeatable(arrays) -> None:
    image = arrays[0][7]
    first = mfm.render_clip(image, "clockwise", np.random.default_rng(11))
    assert first.shape == (16, 28, 28) and first.dtype == np.uint8 and first.max() > 100
    assert np.array_equal(first, mfm.render_clip(image, "clockwise", np.random.default_rng(11)))
    # Interpolation weights are multiples of 1/256: the frame sums are exact and independent of summation order.
    rows = mfm._sampling_matrices(np.array([3.3, 20.1]), np.array([0.6, 1.4]), 28, 14)
    assert np.array_equal(rows * 256, np.rint(rows * 256))
    bigger = mfm.render_clip(image, "left", np.random.default_rng(0), frames=8, size=40, item_size=20)
    assert bigger.shape == (8, 40, 40)


def test_wide_canvas_keeps_the_motion_and_wraps_on_its_own_width(arrays) -> None:
    """``width``: the same jitter stream and item, on a 28 x 36 torus; the height's geometry (travel, size) is
    unchanged, the centre's x is uniform over the wider canvas, and it wraps at 36."""
    image = arrays[0][7]
    square = mfm.render_clip(image, "right", np.random.default_rng(5))
    wide = mfm.render_clip(image, "right", np.random.default_rng(5), width=36)
    assert wide.shape == (16, 28, 36) and wide.dtype == np.uint8
    assert int(wide.sum()) == pytest.approx(int(square.sum()), rel=1e-3)  # same item, same sizes
    cy, cx, _ = mfm.trajectory("right", np.random.default_rng(5), frames=16, size=28, width=36)
    sy, sx, _ = mfm.trajectory("right", np.random.default_rng(5), frames=16, size=28)
    assert np.allclose(cy, sy)
    assert np.allclose(wrapped_steps(cx[:, None], 36), wrapped_steps(sx[:, None], 28))  # the same travel
    xs = np.array(
        [mfm.trajectory("up", np.random.default_rng(i), frames=2, size=28, width=36)[1][0] for i in range(400)]
    )
    assert xs.min() >= 0 and xs.max() < 36 and xs.max() > 30  # uniform over the wide canvas, not the square one
    for bad in (26, 27, 37):
        with pytest.raises(ValueError, match="width must be even and >= size"):
            mfm.render_clip(image, "right", np.random.default_rng(5), width=bad)


@pytest.mark.slow
def test_default_set_size_and_time(arrays, tmp_path) -> None:
    """The default set (1416 distinct clips in 3036 clip files): ~5 s on one core; bound loosely for CI."""
    start = time.perf_counter()
    summary = mfm.generate(tmp_path / "default", *arrays)
    assert time.perf_counter() - start < 60
    assert summary["unique_clips"] == 1416
    assert {v: s["clips"] for v, s in summary["versions"].items()} == {
        "v400": {"train": 640, "validate": 160},
        "v600": {"train": 816, "validate": 200},
        "v700": {"train": 980, "validate": 240},
    }


def test_class_parts_split_every_class_and_understand_old_names() -> None:
    assert mfm.class_parts("tops moving left") == {"group": "tops", "motion": "left"}
    assert mfm.class_parts("tops going round clockwise") == {"group": "tops", "motion": "clockwise"}  # the old name
    assert mfm.class_parts("juggling") is None
    for version, names in mfm.VERSIONS.items():
        assert all(mfm.class_parts(name) is not None for name in names), version
    assert len({tuple(mfm.class_parts(n).values()) for n in mfm.VERSIONS["v700"]}) == 24
