"""image_folder / file_list / webdataset readers and the shared robust decoder, on a small tree built in tmp.

Every bad case must be rejected with its reason (never a crash, a silent drop or a substitution); every
convertible case must be kept, with the pixels load_images returns being the right RGB.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eva_pipeline.ingest import decode
from eva_pipeline.ingest.build import build_manifest
from eva_pipeline.ingest.readers.file_list import parse_list_line
from eva_pipeline.ingest.readers.image_folder import detect_folder_layout
from eva_pipeline.ingest.scan import SourceSpec, source_kinds
from eva_pipeline.loader.pixels import load_images

BOMB_LIMIT = 5000  # Image.MAX_IMAGE_PIXELS during ingestion: the 100x100 "bomb" exceeds it, 32x32 images do not


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _exif_jpeg(quality: int = 95) -> bytes:
    """40 wide x 20 tall, left half red, right half blue, EXIF orientation 6 (display rotated 90 deg clockwise)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(arr), "JPEG", quality=quality, exif=exif.tobytes())


def _palette_png() -> bytes:
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    return _encode(img, "PNG")


CASES: dict[str, bytes] = {}


def _cases() -> dict[str, bytes]:
    if not CASES:
        good_jpeg = _encode(Image.new("RGB", (32, 32), (200, 40, 90)), "JPEG", quality=95)
        big_jpeg = _encode(_noise(64, 64, 0), "JPEG", quality=90)
        CASES.update(
            good_jpeg=good_jpeg,
            good_png=_encode(Image.new("RGB", (32, 32), (1, 2, 3)), "PNG"),
            good_webp=_encode(Image.new("RGB", (32, 32), (0, 128, 255)), "WEBP", lossless=True),
            cmyk=_encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95),  # red
            palette=_palette_png(),
            rgba=_encode(Image.new("RGBA", (32, 32), (255, 0, 0, 128)), "PNG"),
            png16=_encode(Image.fromarray(np.full((32, 32), 40000, np.uint16)), "PNG"),
            gray=_encode(Image.new("L", (32, 32), 77), "PNG"),
            exif=_exif_jpeg(),
            tiny=_encode(Image.new("RGB", (8, 8), (5, 5, 5)), "PNG"),
            empty=b"",
            truncated=big_jpeg[: len(big_jpeg) // 2],
            text=b"this is not an image\n",
            bomb=_encode(Image.new("RGB", (100, 100), (9, 9, 9)), "PNG"),
        )
    return CASES


#: What each case must become: an RGB pixel (kept) or a rejection reason.
EXPECTED_PIXEL = {
    "good_jpeg": (200, 40, 90),
    "good_png": (1, 2, 3),
    "good_webp": (0, 128, 255),
    "cmyk": (255, 0, 0),
    "palette": (10, 200, 30),
    "rgba": (255, 127, 127),
    "png16": (156, 156, 156),  # round(40000 * 255 / 65535)
    "gray": (77, 77, 77),
}
EXPECTED_REASON = {
    "tiny": decode.TOO_SMALL,
    "empty": decode.EMPTY,
    "truncated": decode.CORRUPT,
    "text": decode.NOT_AN_IMAGE,
    "bomb": decode.BOMB,
}
FILE_NAMES = {  # case -> file name (extensions in mixed case on purpose)
    "good_jpeg": "good.jpg", "good_png": "good.png", "good_webp": "good.WEBP", "cmyk": "cmyk.jpeg",
    "palette": "palette.png", "rgba": "rgba.png", "png16": "png16.png", "gray": "gray.PNG", "exif": "exif.jpg",
    "tiny": "tiny.png", "empty": "empty.jpg", "truncated": "truncated.jpg", "text": "text.jpg", "bomb": "bomb.png",
}  # fmt: skip


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    """tree/ (class folders bird (empty), cat, dog), flat/, list.txt + imgs/, wds/ (2 shards)."""
    root = tmp_path_factory.mktemp("sources")
    c = _cases()
    tree = root / "tree"
    (tree / "bird").mkdir(parents=True)
    for case in ("good_jpeg", "good_png", "good_webp", "cmyk", "palette", "rgba"):
        (tree / "cat").mkdir(exist_ok=True)
        (tree / "cat" / FILE_NAMES[case]).write_bytes(c[case])
    (tree / "dog" / "nested").mkdir(parents=True)
    (tree / "dog" / "nested" / FILE_NAMES["png16"]).write_bytes(c["png16"])
    for case in ("gray", "exif", *EXPECTED_REASON):
        (tree / "dog" / FILE_NAMES[case]).write_bytes(c[case])
    (tree / "dog" / "notes.txt").write_text("not an image name: ignored, but counted")

    flat = root / "flat"
    (flat / "sub").mkdir(parents=True)
    (flat / "a.png").write_bytes(_encode(_noise(20, 20, 1), "PNG"))
    (flat / "sub" / "b.jpg").write_bytes(_encode(_noise(24, 20, 2), "JPEG"))

    imgs = root / "lists" / "imgs"
    imgs.mkdir(parents=True)
    (imgs / "dup.jpg").write_bytes(c["good_jpeg"])  # the same bytes as tree/cat/good.jpg
    (imgs / "gray.png").write_bytes(_encode(Image.new("L", (30, 30), 200), "PNG"))
    (imgs / "with space.png").write_bytes(_encode(_noise(18, 18, 3), "PNG"))
    (root / "lists" / "list.txt").write_text(
        "# a comment\n\nimgs/dup.jpg 5\nimgs/gray.png\t3\nimgs/with space.png\nimgs/missing.jpg 1\n"
        "imgs/gray.png\t4\nimgs/dup.jpg\tnot-a-label\n"
    )

    wds = root / "wds"  # images of their own (not duplicates of the tree's)
    wds.mkdir()
    _tar(wds / "00000.tar", [
        ("000000000.jpg", _encode(Image.new("RGB", (32, 32), (10, 20, 30)), "JPEG")),
        ("000000000.txt", b"a caption"), ("000000000.json", b"{}"),
        ("000000001.png", _encode(Image.new("RGBA", (32, 32), (0, 0, 255, 128)), "PNG")), ("000000001.cls", b"7"),
        ("000000002.jpg", c["truncated"]),
    ])  # fmt: skip
    _tar(wds / "00001.tar", [
        ("000000003.webp", _encode(Image.new("RGB", (32, 32), (50, 60, 70)), "WEBP", lossless=True)),
        ("000000004.txt", b"caption without an image"),
        ("000000005.png", _exif_jpeg(quality=80)),  # a JPEG under a .png name: PIL sniffs the content
        ("000000006.jpg", c["text"]),
    ])  # fmt: skip
    return root


SOURCES = ("tree", "flat", "list", "wds")


def _specs(root: Path) -> list[SourceSpec]:
    return [
        SourceSpec("tree", "image_folder", "pretrain", root / "tree"),
        SourceSpec("flat", "image_folder", "probe", root / "flat"),
        SourceSpec("list", "file_list", "pretrain", root / "lists" / "list.txt"),
        SourceSpec("wds", "webdataset", "pretrain", root / "wds"),
    ]


@pytest.fixture(scope="module")
def ingested(layout):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)
        manifest, report = build_manifest(_specs(layout), rejections_path=layout / "report" / "rejections.jsonl")
    return layout, manifest, report


def _rejections(report: dict, source: str) -> dict[str, str]:
    return {Path(r["location"]).name: r["reason"] for r in report["sources"][source]["rejected_examples"]}


def test_kinds_registered() -> None:
    assert {"idx", "image_folder", "file_list", "webdataset"} <= set(source_kinds())


@pytest.mark.parametrize(
    "module",
    [
        "eva_pipeline.ingest.readers",
        "eva_pipeline.ingest.build",
        pytest.param("eva_pipeline.preflight", marks=pytest.mark.slow),  # imports torch and the teachers: ~10 s
    ],
)
def test_importing_registers_the_builtin_kinds(module) -> None:
    """In a fresh interpreter: the readers package, the build and preflight's source check see every built-in kind."""
    code = f"import {module}\nfrom eva_pipeline.ingest.scan import source_kinds\nprint(','.join(source_kinds()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "file_list,idx,image_folder,webdataset"


def test_counts_add_up(ingested) -> None:
    _, manifest, report = ingested
    for name, src in report["sources"].items():
        assert src["found"] == src["kept"] + src["rejected"] + src["duplicates"], name
        assert src["kept"] == int((manifest["source"] == name).sum())
        assert sum(src["rejection_reasons"].values()) == src["rejected"]
    totals = report["totals"]
    assert totals["found"] == totals["kept"] + totals["rejected"] + totals["duplicates"]


def test_image_folder_class_folders_labels_and_rejections(ingested) -> None:
    _, manifest, report = ingested
    src = report["sources"]["tree"]
    assert src["layout"] == "class_folders" and src["classes"] == ["bird", "cat", "dog"]
    assert src["ignored_files"] == 1 and src["ignored_examples"][0].endswith("dog/notes.txt")
    assert _rejections(report, "tree") == {FILE_NAMES[k]: reason for k, reason in EXPECTED_REASON.items()}
    assert src["kept"] == 9 and src["available"] == 14 and src["duplicates"] == 0
    rows = manifest[manifest["source"] == "tree"]
    rows = rows.set_index(rows["location"].map(lambda s: Path(s).name))
    assert int(rows.loc["cmyk.jpeg", "label"]) == 1 and int(rows.loc["png16.png", "label"]) == 2  # bird=0 (empty)
    assert set(rows["label"].astype(int)) == {1, 2}
    assert rows.loc["good.jpg", "content_hash"] == hashlib.sha1(_cases()["good_jpeg"]).hexdigest()
    assert rows.loc["good.jpg", "size_bytes"] == len(_cases()["good_jpeg"])


def test_convertible_cases_load_as_correct_rgb(ingested) -> None:
    _, manifest, _ = ingested
    rows = manifest[manifest["source"] == "tree"]
    by_name = {Path(loc).name: i for i, loc in zip(rows.index, rows["location"], strict=True)}
    for case, rgb in EXPECTED_PIXEL.items():
        pixels = load_images(manifest.loc[[by_name[FILE_NAMES[case]]]])
        assert pixels.shape == (1, 3, 32, 32), case
        tol = 12 if case in ("cmyk", "good_jpeg") else 1  # lossy JPEG / CMYK conversion: roughly right
        got = pixels[0, :, 16, 16].tolist()
        assert np.abs(np.subtract(got, rgb)).max() <= tol, (case, got, rgb)


def test_exif_rotation_swaps_size_and_rotates_pixels(ingested) -> None:
    _, manifest, _ = ingested
    row = manifest[manifest["location"].str.endswith("tree/dog/exif.jpg")]
    assert (int(row["width"].iloc[0]), int(row["height"].iloc[0])) == (20, 40)  # stored 40x20, orientation 6
    pixels = load_images(row)[0]
    assert pixels.shape == (3, 40, 20)
    # Rotated 90 deg clockwise: the left (red) half is now on top, the right (blue) half at the bottom.
    assert pixels[:, 5, 10].tolist()[0] > 200 and pixels[:, 5, 10].tolist()[2] < 50
    assert pixels[:, 35, 10].tolist()[2] > 200 and pixels[:, 35, 10].tolist()[0] < 50


def test_flat_folder_is_unlabelled(ingested) -> None:
    _, manifest, report = ingested
    assert report["sources"]["flat"]["layout"] == "flat" and report["sources"]["flat"]["classes"] is None
    rows = manifest[manifest["source"] == "flat"]
    assert rows["label"].isna().all() and [Path(p).name for p in rows["location"]] == ["a.png", "b.jpg"]
    assert load_images(rows.iloc[[1]]).shape == (1, 3, 20, 24)


def test_file_list_resolves_paths_labels_missing_and_duplicates(ingested) -> None:
    root, manifest, report = ingested
    src = report["sources"]["list"]
    assert src["found"] == 6 and src["kept"] == 2 and src["duplicates"] == 1 and src["rejected"] == 3
    good = manifest.loc[manifest["location"].str.endswith("tree/cat/good.jpg")]
    # the duplicate by its location, the kept copy by its location and manifest id; the list's label 5 is class "5",
    # the kept copy's class is "cat": a label conflict (sources are combined by class name)
    assert src["duplicate_examples"] == [
        {
            "location": (root / "lists/imgs/dup.jpg").as_posix(),
            "duplicate_of": good["location"].item(),
            "duplicate_of_source": "tree",
            "duplicate_of_id": good["id"].item(),
            "label": "5",
            "duplicate_of_label": "cat",
            "label_conflict": True,
        }
    ]
    assert src["label_conflicts"] == 1 and src["label_conflict_examples"] == src["duplicate_examples"]
    reasons = {r["location"].split("/lists/")[-1]: r["reason"] for r in src["rejected_examples"]}
    assert reasons == {"imgs/missing.jpg": "missing file", "imgs/gray.png": "repeated entry", "list.txt:8": "bad line"}
    rows = manifest[manifest["source"] == "list"]
    assert rows["location"].tolist() == [(root / "lists/imgs" / n).as_posix() for n in ("gray.png", "with space.png")]
    assert rows["label"].tolist()[0] == 3 and rows["label"].isna().tolist() == [False, True]
    assert load_images(rows.iloc[[0]])[0, :, 3, 3].tolist() == [200, 200, 200]


def test_webdataset_shards(ingested) -> None:
    _root, manifest, report = ingested
    src = report["sources"]["wds"]
    assert src["shards"] == 2 and src["available"] == 7 and not src["available_is_lower_bound"]
    assert {k.split("#")[-1]: v for k, v in ((r["location"], r["reason"]) for r in src["rejected_examples"])} == {
        "000000002.jpg": decode.CORRUPT,
        "000000004": "no image in sample",
        "000000006.jpg": decode.NOT_AN_IMAGE,
    }
    rows = manifest[manifest["source"] == "wds"].reset_index(drop=True)
    assert [loc.split("/wds/")[-1] for loc in rows["location"]] == [
        "00000.tar#000000000.jpg", "00000.tar#000000001.png", "00001.tar#000000003.webp", "00001.tar#000000005.png"
    ]  # fmt: skip
    assert rows["label"].tolist()[1] == 7 and rows["label"].isna().tolist() == [True, False, True, True]
    pixels = load_images(rows.iloc[:3])  # two shards, 32x32 items, each shard read once
    assert pixels[1, :, 4, 4].tolist() == [127, 127, 255]  # RGBA over white
    assert pixels[2, :, 4, 4].tolist() == [50, 60, 70]
    assert load_images(rows.iloc[[3]]).shape == (1, 3, 40, 20)  # EXIF rotation inside a shard too
    assert load_images(rows.iloc[:3], verify_hashes=True).shape == (3, 3, 32, 32)  # encoded hashes: not compared


def test_class_names_of_each_kind(ingested) -> None:
    """Class folders: every folder, sorted (bird has no image); integer labels without 'classes': "0".. up to the
    largest label of an accepted item, kept or not (list/0, label 5, is a duplicate); unlabelled: none."""
    _, _, report = ingested
    classes = {name: src["classes"] for name, src in report["sources"].items()}
    assert classes == {
        "tree": ["bird", "cat", "dog"],
        "flat": None,
        "list": ["0", "1", "2", "3", "4", "5"],
        "wds": ["0", "1", "2", "3", "4", "5", "6", "7"],
    }


def test_given_class_names_and_labels_outside_them(layout, tmp_path) -> None:
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse"]
    specs = [
        SourceSpec("list", "file_list", "pretrain", layout / "lists" / "list.txt", classes=names[:6]),
        SourceSpec("wds", "webdataset", "pretrain", layout / "wds", classes=names),
    ]
    _, report = build_manifest(specs)
    assert report["sources"]["list"]["classes"] == names[:6] and report["sources"]["wds"]["classes"] == names
    with pytest.raises(ValueError) as info:  # an error of the build, not a rejection: nothing is written
        build_manifest([SourceSpec("wds", "webdataset", "pretrain", layout / "wds", classes=names[:7])])
    assert (
        "source 'wds': 1 item(s) have a label outside its 7 class names (labels 0..6), e.g. "
        f"['{(layout / 'wds' / '00000.tar').as_posix()}#000000001.png (label 7)']; check its 'classes'"
    ) in str(info.value)
    (tmp_path / "neg.txt").write_text(f"{(layout / 'flat' / 'a.png').as_posix()} -1\n")
    with pytest.raises(ValueError, match=r"source 'neg': 1 item\(s\) have a label outside 0\.\.999,999.*\(label -1\)"):
        build_manifest([SourceSpec("neg", "file_list", "pretrain", tmp_path / "neg.txt")])
    (tmp_path / "nolabel.txt").write_text(f"{(layout / 'flat' / 'a.png').as_posix()}\n")
    with pytest.raises(ValueError, match="'classes' names 2 classes but no item has a label"):
        build_manifest([SourceSpec("u", "file_list", "pretrain", tmp_path / "nolabel.txt", classes=["a", "b"])])


def test_an_image_folder_takes_no_class_names(layout) -> None:
    with pytest.raises(ValueError, match=r"source 'tree': an image_folder source's class names are its class folders"):
        SourceSpec("tree", "image_folder", "pretrain", layout / "tree", classes=["bird", "cat", "dog"])


def test_rejections_file_lists_everything(ingested) -> None:
    root, _, report = ingested
    lines = [json.loads(x) for x in (root / "report" / "rejections.jsonl").read_text().splitlines()]
    totals = report["totals"]
    assert len(lines) == totals["rejected"] + totals["duplicates"]  # every item found and not kept
    assert report["rejections_file"].endswith("rejections.jsonl")
    assert all({"source", "location", "reason", "detail"} <= set(line) for line in lines)
    assert [line["source"] for line in lines] == sorted((line["source"] for line in lines), key=list(SOURCES).index)
    duplicates = [line for line in lines if line["reason"] == "duplicate"]
    assert len(duplicates) == totals["duplicates"] == 1
    assert duplicates[0] == {"source": "list", **report["sources"]["list"]["duplicate_examples"][0]} | {
        "reason": "duplicate",
        "detail": f"same content as {(root / 'tree/cat/good.jpg').as_posix()} (source 'tree'), the copy kept; "
        "label conflict: class '5' here, 'cat' on the kept copy (the manifest's)",
    }
    assert not [line for line in lines if re.search(r"\b0x[0-9a-fA-F]+", line["detail"])]  # no memory address


def test_limits_and_explicit_layout(layout) -> None:
    specs = [
        SourceSpec("tree", "image_folder", "pretrain", layout / "tree", limit=3),
        SourceSpec("flatdog", "image_folder", "pretrain", layout / "tree" / "dog", layout="flat", limit=2),
        SourceSpec("wds", "webdataset", "pretrain", layout / "wds" / "00000.tar", limit=2),
        SourceSpec("list", "file_list", "probe", layout / "lists" / "list.txt", limit=2),
    ]
    manifest, report = build_manifest(specs)
    tree, wds = report["sources"]["tree"], report["sources"]["wds"]
    assert tree["available"] == 14 and tree["found"] == 3
    assert report["sources"]["flatdog"]["layout"] == "flat"
    assert manifest.loc[manifest["source"] == "flatdog", "label"].isna().all()
    assert wds["found"] == 2 and wds["available_is_lower_bound"]
    assert report["sources"]["list"]["available"] == 6 and report["sources"]["list"]["found"] == 2
    with pytest.raises(ValueError, match="layout"):
        SourceSpec("x", "image_folder", "pretrain", layout, layout="nested")


def test_detect_layout_and_parse_list_line(layout, tmp_path) -> None:
    assert detect_folder_layout(layout / "tree") == "class_folders"
    assert detect_folder_layout(layout / "flat") == "flat"
    (tmp_path / "root.jpg").write_bytes(b"")
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "x.jpg").write_bytes(b"")
    assert detect_folder_layout(tmp_path) == "flat"  # an image at the root: not a class-folder tree
    assert parse_list_line("a b.jpg\t3") == ("a b.jpg", 3)
    assert parse_list_line("a b.jpg") == ("a b.jpg", None)
    assert parse_list_line("x.jpg -1") == ("x.jpg", -1)
    with pytest.raises(ValueError):
        parse_list_line("x.jpg\tcat")


def test_decode_image_modes_directly() -> None:
    la = _encode(Image.new("LA", (20, 20), (0, 0)), "PNG")  # fully transparent black -> white
    img, why = decode.decode_image(la, "la.png")
    assert why is None and img.mode == "RGB" and img.getpixel((3, 3)) == (255, 255, 255)
    img, why = decode.decode_image(_cases()["png16"], "p16.png", min_side=64)
    assert img is None and why.reason == decode.TOO_SMALL and "32x32" in why.detail
    assert decode.is_image_name("A.TIFF") and not decode.is_image_name("a.txt") and not decode.is_image_name("jpg")


def test_damaged_shard_and_misuse(tmp_path) -> None:
    good = _encode(_noise(32, 32, 7), "PNG")
    _tar(tmp_path / "00000.tar", [("a.png", good), ("b.png", _encode(_noise(32, 32, 8), "PNG") * 3)])
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[: 512 + len(good) + 512 + 700])  # cut inside member b
    manifest, report = build_manifest([SourceSpec("w", "webdataset", "pretrain", tmp_path)])
    src = report["sources"]["w"]
    assert src["kept"] == 1 and manifest["location"].item().endswith("00000.tar#a.png")
    assert src["rejection_reasons"] == {"corrupt shard": 1}
    assert src["found"] == src["kept"] + src["rejected"] + src["duplicates"]
    with pytest.raises(ValueError, match="takes no labels file"):
        build_manifest([SourceSpec("w", "webdataset", "pretrain", tmp_path, labels=tmp_path / "00000.tar")])
    with pytest.raises(ValueError, match=r"no .tar shards"):
        (tmp_path / "empty").mkdir()
        build_manifest([SourceSpec("w", "webdataset", "pretrain", tmp_path / "empty")])


def test_source_with_nothing_readable(tmp_path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"")
    manifest, report = build_manifest([SourceSpec("bad", "image_folder", "pretrain", tmp_path)])
    assert len(manifest) == 0 and report["sources"]["bad"]["rejection_reasons"] == {decode.EMPTY: 1}


def test_small_chunks_give_the_same_manifest_and_rejections(ingested, tmp_path) -> None:
    """Every reader through 2-item chunks (spilled items and rejections) and 3-row row groups: the same output."""
    import pandas as pd

    layout, manifest, report = ingested
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)
        small, small_report = build_manifest(
            _specs(layout), rejections_path=tmp_path / "rejections.jsonl", chunk_rows=2, row_group_rows=3
        )
    pd.testing.assert_frame_equal(small, manifest)
    small_report["rejections_file"] = report["rejections_file"]
    assert json.dumps(small_report, sort_keys=True) == json.dumps(report, sort_keys=True)  # byte for byte
    rejections = (layout / "report" / "rejections.jsonl").read_bytes()
    assert (tmp_path / "rejections.jsonl").read_bytes() == rejections


def test_parallel_decode_gives_the_same_manifest_report_and_cache(ingested, tmp_path, monkeypatch) -> None:
    """Decoding ahead in threads changes nothing but speed: same rows, same report, same rejections, same order;
    and a cached re-run with threads reads nothing."""
    import dataclasses

    import pandas as pd

    from eva_pipeline.ingest.readers import common as readers_common

    layout, manifest, report = ingested
    threads: set[str] = set()
    real_decode = readers_common.decode_image

    def spy(data, name, **kwargs):
        import threading

        threads.add(threading.current_thread().name)
        return real_decode(data, name, **kwargs)

    monkeypatch.setattr(readers_common, "decode_image", spy)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)
    from eva_pipeline.ingest import scan_cache

    monkeypatch.setattr(scan_cache, "RACY_NS", 0)  # the tree was written just now: cache it anyway
    specs = [dataclasses.replace(s, decode_workers=3) for s in _specs(layout)]
    parallel, parallel_report = build_manifest(
        specs, rejections_path=tmp_path / "rejections.jsonl", cache_dir=tmp_path / "cache"
    )
    assert any(name.startswith("ingest-decode") for name in threads)  # really decoded in the pool
    pd.testing.assert_frame_equal(parallel, manifest)
    for source, entry in parallel_report["sources"].items():
        expected = report["sources"][source]
        for key in ("found", "kept", "rejected", "duplicates", "rejection_reasons", "available"):
            assert entry[key] == expected[key], (source, key)
        assert entry["rejected_examples"] == expected["rejected_examples"]
        assert entry["duplicate_examples"] == expected["duplicate_examples"]
    assert (tmp_path / "rejections.jsonl").read_bytes() == (layout / "report" / "rejections.jsonl").read_bytes()
    threads.clear()
    again, again_report = build_manifest(specs, cache_dir=tmp_path / "cache")
    pd.testing.assert_frame_equal(again, manifest)
    assert not threads  # everything came from the cache: nothing decoded, in the pool or inline
    for entry in again_report["sources"].values():  # only what cannot be stamped (missing files) is looked at again
        assert entry.get("read", 0) == entry["rejection_reasons"].get("missing file", 0)
