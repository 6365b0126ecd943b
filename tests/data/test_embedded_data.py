"""The embedded real data in data/01_raw/: checksums, counts and class names as each folder's README documents them,
decoding through the ``idx`` source kind, the combined 20-class label space, and the provenance scripts (restricted
unpickling, deterministic output; the runs on the real sources are slow and need the wheel / the Debian files)."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import re
import zipfile
from pathlib import Path

import make_embedded_animal_mnist as animal
import make_embedded_fashion_mnist as fashion
import numpy as np
import pandas as pd
import pytest
import yaml

from eva_pipeline.config import IngestionParams
from eva_pipeline.ingest.build import build_manifest
from eva_pipeline.ingest.readers.idx import read_idx, read_idx_source, write_idx
from eva_pipeline.ingest.scan import SourceSpec
from eva_pipeline.manifest import select_split

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RAW = PROJECT_ROOT / "data" / "01_raw"
FOLDERS = ("fashion_mnist", "animal_mnist")


def _readme(folder: str, root: Path = RAW) -> str:
    return (root / folder / "README.md").read_text(encoding="utf-8")


def _checksums(folder: str, root: Path = RAW) -> dict[str, str]:
    """The ``sha256sum`` lines of the README: file name -> digest."""
    return {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", _readme(folder, root), re.M)}


def _checksum_problems(folder: str, root: Path = RAW) -> list[str]:
    """Files whose digest differs from the README's, and files listed but absent or present but not listed."""
    listed = _checksums(folder, root)
    present = {p.name for p in (root / folder).iterdir() if p.name != "README.md"}
    problems = [f"not listed: {name}" for name in sorted(present - set(listed))]
    problems += [f"missing: {name}" for name in sorted(set(listed) - present)]
    digests = {name: hashlib.sha256((root / folder / name).read_bytes()).hexdigest() for name in present & set(listed)}
    return problems + [f"changed: {name}" for name in sorted(digests) if digests[name] != listed[name]]


def _count_rows(folder: str) -> dict[str, tuple[int, list[int]]]:
    """The README's counts table: prefix -> (images, images per label 0..9)."""
    rows = re.findall(r"^\| `([\w-]+)` \|(?: [^|]+ \|)? ([\d,]+) \| ([\d ]+) \|", _readme(folder), re.M)
    return {prefix: (int(n.replace(",", "")), [int(c) for c in counts.split()]) for prefix, n, counts in rows}


def _class_names(folder: str) -> list[str]:
    """'Class names in label order (...): 0 a, 1 b, ..., 9 j.' -> [a, ..., j], the numbers checked."""
    match = re.search(r"Class names in label order[^:]*: (.*?)\.(?:\s|$)", _readme(folder), re.S)
    assert match, f"{folder}/README.md has no class-name list"
    pairs = [item.split(" ", 1) for item in " ".join(match.group(1).split()).split(", ")]
    assert [int(number) for number, _ in pairs] == list(range(len(pairs)))
    return [name for _, name in pairs]


def _pair(folder: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    return (
        read_idx(RAW / folder / f"{prefix}-images-idx3-ubyte.gz"),
        read_idx(RAW / folder / f"{prefix}-labels-idx1-ubyte.gz"),
    )


# ------------------------------------------------------------------------------------- what the READMEs document
@pytest.mark.parametrize("folder", FOLDERS)
def test_every_embedded_file_has_the_checksum_of_its_readme(folder) -> None:
    assert len(_checksums(folder)) >= 3
    assert _checksum_problems(folder) == []


def test_the_checksum_check_sees_a_changed_an_extra_and_a_missing_file(tmp_path) -> None:
    copy = tmp_path / "animal_mnist"
    copy.mkdir()
    for p in (RAW / "animal_mnist").iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    licence = bytearray((copy / "LICENSE").read_bytes())
    licence[0] ^= 1
    (copy / "LICENSE").write_bytes(bytes(licence))
    (copy / "extra.gz").write_bytes(b"")
    (copy / "train-labels-idx1-ubyte.gz").unlink()
    assert _checksum_problems("animal_mnist", tmp_path) == [
        "not listed: extra.gz",
        "missing: train-labels-idx1-ubyte.gz",
        "changed: LICENSE",
    ]


@pytest.mark.parametrize("folder", FOLDERS)
def test_label_counts_and_shapes_are_the_documented_ones(folder) -> None:
    rows = _count_rows(folder)
    assert rows, f"{folder}/README.md has no counts table"
    prefixes = {p.name.split("-images-")[0] for p in (RAW / folder).glob("*-images-idx3-ubyte.gz")}
    assert set(rows) == prefixes
    for prefix, (count, per_label) in rows.items():
        images, labels = _pair(folder, prefix)
        assert images.shape == (count, 28, 28) and images.dtype == np.uint8, (prefix, images.shape)
        assert labels.shape == (count,) and sum(per_label) == count
        assert np.bincount(labels, minlength=10).tolist() == per_label, prefix


@pytest.mark.parametrize(
    ("folder", "prefix", "count"),
    [("fashion_mnist", "t10k-fresh", 2000), ("animal_mnist", "train", 10000)],
)
def test_new_files_decode_through_the_idx_source_kind(folder, prefix, count) -> None:
    images = RAW / folder / f"{prefix}-images-idx3-ubyte.gz"
    spec = SourceSpec(prefix, "idx", "probe", images, RAW / folder / f"{prefix}-labels-idx1-ubyte.gz")
    scan = read_idx_source(spec)
    assert scan.available == len(scan.locations) == count
    assert set(scan.widths) == set(scan.heights) == {28}
    assert scan.locations[-1] == f"{images.as_posix()}#{count - 1}"
    assert sorted(set(scan.labels)) == list(range(10))


def test_animal_files_are_class_interleaved_with_the_documented_duplicates() -> None:
    images, labels = _pair("animal_mnist", "train")
    assert labels.tolist() == [j % 10 for j in range(10000)]  # image j has label j mod 10: every prefix balanced
    first_seen: dict[bytes, int] = {}
    for j, image in enumerate(images):
        first_seen.setdefault(image.tobytes(), j)
    distinct = np.bincount(labels[sorted(first_seen.values())], minlength=10).tolist()
    assert distinct == [937, 812, 992, 996, 997, 1000, 1000, 997, 985, 1000]
    assert len(first_seen) == 9716
    assert "keeps 9,716" in _readme("animal_mnist")
    assert distinct == [int(c) for c in re.findall(r"\| ([\d ]+) \|$", _readme("animal_mnist"), re.M)[0].split()]
    # white silhouettes on black, like Fashion-MNIST
    assert np.median(images) == 0 and images.max() == 255 and 50 < images.mean() < 90


def test_the_fresh_fashion_test_set_is_disjoint_from_the_other_embedded_images() -> None:
    fresh, _ = _pair("fashion_mnist", "t10k-fresh")
    seen = {image.tobytes() for prefix in ("train", "t10k") for image in _pair("fashion_mnist", prefix)[0]}
    animals = {image.tobytes() for image in _pair("animal_mnist", "train")[0]}
    fresh_set = {image.tobytes() for image in fresh}
    assert len(fresh_set) == 2000 and not fresh_set & seen
    assert not animals & (seen | fresh_set)


def test_label_spaces_are_disjoint_and_combine_into_20_classes() -> None:
    fashion_names, animal_names = _class_names("fashion_mnist"), _class_names("animal_mnist")
    assert fashion_names == list(fashion.CLASS_NAMES)
    assert animal_names == list(animal.CLASS_NAMES)
    assert not {n.lower() for n in fashion_names} & {n.lower() for n in animal_names}
    _, fashion_labels = _pair("fashion_mnist", "train")
    _, animal_labels = _pair("animal_mnist", "train")
    combined = np.concatenate([fashion_labels, animal_labels.astype(np.int64) + len(fashion_names)])
    assert np.unique(combined).tolist() == list(range(20))
    assert len(fashion_names + animal_names) == 20


def test_the_default_ingestion_conf_splits_and_names_the_embedded_data() -> None:
    """conf/base's four sources: Animal-MNIST fine-tunes (its 284 in-class copies dropped), the fresh Fashion-MNIST
    set is held out for evaluation, every source is named as its README says, and the pre-training and probe rows
    are exactly those of the two Fashion-MNIST sources alone (the conf before the two were added)."""
    params = yaml.safe_load((PROJECT_ROOT / "conf" / "base" / "parameters_ingestion.yml").read_text())["ingestion"]
    specs = []
    for source in IngestionParams.model_validate(params).sources:
        paths = {key: PROJECT_ROOT / getattr(source, key) for key in ("images", "labels")}
        specs.append(SourceSpec(**{**source.model_dump(), **paths}))
    manifest, report = build_manifest(specs)
    assert [(s.name, s.split) for s in specs] == [
        ("fashion_mnist_train", "pretrain"),
        ("fashion_mnist_test", "probe"),
        ("animal_mnist", "finetune"),
        ("fashion_mnist_fresh", "eval"),
    ]
    assert manifest["split"].value_counts().to_dict() == {
        "pretrain": 10000,
        "finetune": 9716,
        "probe": 5000,
        "eval": 2000,
    }
    animals = report["sources"]["animal_mnist"]
    assert (animals["found"], animals["kept"], animals["duplicates"], animals["rejected"]) == (10000, 9716, 284, 0)
    assert all(d["duplicate_of_source"] == "animal_mnist" for d in animals["duplicate_examples"])
    assert all(d["duplicate_of"].split("#")[0] == d["location"].split("#")[0] for d in animals["duplicate_examples"])
    assert animals["label_conflicts"] == 0 and report["warnings"] == []  # in-class copies: each with its own label
    assert report["totals"]["duplicates"] == 284  # nothing else is a copy: no source loses an image to another
    names = {name: src["classes"] for name, src in report["sources"].items()}
    fashion_names = _class_names("fashion_mnist")
    assert names == {
        "fashion_mnist_train": fashion_names,
        "fashion_mnist_test": fashion_names,
        "animal_mnist": _class_names("animal_mnist"),
        "fashion_mnist_fresh": fashion_names,
    }
    fine = manifest[manifest["split"] == "finetune"]
    assert fine["label"].value_counts().sort_index().tolist() == [937, 812, 992, 996, 997, 1000, 1000, 997, 985, 1000]
    before, _ = build_manifest(specs[:2])
    columns = ["id", "source", "location", "label", "width", "height", "size_bytes", "content_hash"]
    for split in ("pretrain", "probe"):
        pd.testing.assert_frame_equal(select_split(manifest, split)[columns], select_split(before, split)[columns])


def test_animal_script_constants_match_the_readme() -> None:
    text = _readme("animal_mnist")
    for member, digest in animal.MEMBER_SHA256.items():
        assert f"| member `{member}` | `{digest}` |" in text
    assert f"`{animal.WHEEL_SHA256}`" in text and animal.WHEEL_NAME in text
    licence = (RAW / "animal_mnist" / "LICENSE").read_bytes()
    assert hashlib.sha256(licence).hexdigest() == animal.MEMBER_SHA256[animal.LICENSE_MEMBER]
    assert b"MIT License" in licence and b"Copyright (c) 2025 SinaSR-6" in licence


# ------------------------------------------------------------------------------- the scripts, on synthetic input
class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but a callable the restricted unpickler must refuse


@pytest.mark.parametrize("protocol", [3, 4])  # protocol 2 stores bytes through _codecs.encode: refused
def test_restricted_unpickler_builds_numpy_arrays(protocol) -> None:
    for array in (np.arange(12, dtype=np.uint8).reshape(2, 2, 3), np.array([3, 1, 2], dtype=np.int64)):
        back = animal.load_array(pickle.dumps(array, protocol=protocol), "x")
        assert back.dtype == array.dtype and np.array_equal(back, array)


def test_restricted_unpickler_refuses_other_globals_and_object_arrays() -> None:
    with pytest.raises(pickle.UnpicklingError, match=r"refused global posix\.getcwd|refused global os\.getcwd"):
        animal.load_array(pickle.dumps(_Payload(), protocol=4), "x")
    with pytest.raises(pickle.UnpicklingError, match="refused global"):  # nested inside a container
        animal.load_array(pickle.dumps({"a": _Payload()}, protocol=4), "x")
    with pytest.raises(ValueError, match="plain NumPy array"):
        animal.load_array(pickle.dumps(np.array([1, "a"], dtype=object), protocol=4), "x")
    with pytest.raises(ValueError, match="plain NumPy array"):
        animal.load_array(pickle.dumps([1, 2], protocol=4), "x")


def test_interleave_balances_every_prefix_for_unequal_classes() -> None:
    labels = np.array([2, 2, 2, 0, 0, 1, 2, 1])
    order = animal.interleave(labels)
    assert labels[order].tolist() == [0, 1, 2, 0, 1, 2, 2, 2]
    assert order.tolist() == [3, 5, 0, 4, 7, 1, 2, 6]  # stable within each class


def _fake_wheel(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(animal.IMAGES_MEMBER, gzip.compress(pickle.dumps(images, protocol=4)))
        wheel.writestr(animal.LABELS_MEMBER, gzip.compress(pickle.dumps(labels, protocol=4)))
        wheel.writestr(animal.LICENSE_MEMBER, b"MIT License\n")
    return path


def test_animal_build_is_deterministic_and_checks_member_digests(tmp_path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10, dtype=np.int64), 3)
    images = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    wheel = _fake_wheel(tmp_path / "fake.whl", images, labels)
    first = animal.build(wheel, tmp_path / "a", expected=None)
    second = animal.build(wheel, tmp_path / "b", expected=None)
    assert sorted(first) == sorted(animal.OUTPUTS)
    for name in animal.OUTPUTS:
        assert first[name].read_bytes() == second[name].read_bytes(), name
    out_images = read_idx(first["train-images-idx3-ubyte.gz"])
    out_labels = read_idx(first["train-labels-idx1-ubyte.gz"])
    j = np.arange(30)
    assert out_labels.dtype == np.uint8 and out_labels.tolist() == (j % 10).tolist()
    assert np.array_equal(out_images, images[3 * (j % 10) + j // 10])
    with pytest.raises(ValueError, match=r"sha256 .* \(not the animal-mnist 0\.4 wheel\?\)"):
        animal.build(wheel, tmp_path / "c")  # the real digests are checked by default


def test_animal_build_rejects_wrong_shapes_and_labels(tmp_path) -> None:
    bad = _fake_wheel(tmp_path / "a.whl", np.zeros((2, 32, 32), np.uint8), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"expected uint8 \(N, 28, 28\)"):
        animal.read_wheel(bad, expected=None)
    bad = _fake_wheel(tmp_path / "b.whl", np.zeros((2, 28, 28), np.uint8), np.array([0, 10]))
    with pytest.raises(ValueError, match=r"labels outside 0\.\.9"):
        animal.read_wheel(bad, expected=None)


def test_fashion_subset_keeps_the_requested_slice_byte_for_byte(tmp_path) -> None:
    images = np.arange(7 * 2 * 3, dtype=np.uint8).reshape(7, 2, 3)
    write_idx(tmp_path / "src.gz", images)
    fashion._subset(tmp_path / "src.gz", tmp_path / "a.gz", 5, 7)
    fashion._subset(tmp_path / "src.gz", tmp_path / "b.gz", 5, 7)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), images[5:7])
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    with pytest.raises(ValueError, match=r"holds 7 items, asked for 5\.\.7"):
        fashion._subset(tmp_path / "src.gz", tmp_path / "c.gz", 5, 8)
    # the fresh slice starts where the embedded probe slice ends: disjoint by construction
    (_, a0, a1, _), (_, b0, b1, _) = [s for s in fashion.SUBSETS if s[0] == "t10k"]
    assert a0 == 0 and a1 == b0 < b1


# ---------------------------------------------------------------------------- the scripts, on the real sources
@pytest.mark.slow
def test_animal_script_rebuilds_the_embedded_files_from_the_wheel(tmp_path) -> None:
    """Needs the wheel (`pip download animal-mnist==0.4 --no-deps`) named by EVA_ANIMAL_MNIST_WHEEL."""
    wheel = Path(os.environ.get("EVA_ANIMAL_MNIST_WHEEL", "/nonexistent"))
    if not wheel.is_file():
        pytest.skip("set EVA_ANIMAL_MNIST_WHEEL to the animal_mnist-0.4 wheel to rebuild the embedded files")
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == animal.WHEEL_SHA256
    for name, path in animal.build(wheel, tmp_path).items():
        assert path.read_bytes() == (RAW / "animal_mnist" / name).read_bytes(), name


@pytest.mark.slow
def test_fashion_script_rebuilds_the_embedded_files_from_the_debian_files(tmp_path, monkeypatch) -> None:
    """Needs Debian's dataset-fashion-mnist files (installed, or FASHION_MNIST_SOURCE naming their folder)."""
    source = Path(os.environ.get("FASHION_MNIST_SOURCE", fashion.SOURCE))
    if not (source / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no Fashion-MNIST originals in {source} (apt-get install dataset-fashion-mnist)")
    monkeypatch.setattr("sys.argv", ["x", "--source", str(source), "--target", str(tmp_path)])
    fashion.main()
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in (RAW / "fashion_mnist").glob("*.gz"))
    for name in written:
        assert (tmp_path / name).read_bytes() == (RAW / "fashion_mnist" / name).read_bytes(), name
