"""Rejection details that are the same from run to run (no memory address), so that the DVC-tracked rejections list
changes only with the data; :mod:`eva_pipeline.ingest.details` is the one helper for it."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from eva_pipeline.ingest import decode
from eva_pipeline.ingest.build import build_manifest
from eva_pipeline.ingest.details import exception_detail, stable_text
from eva_pipeline.ingest.scan import SourceScan, SourceSpec

ADDRESS = re.compile(r"\b0x[0-9a-fA-F]+")


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.as_posix()


def test_a_corrupt_image_has_the_same_detail_on_every_build(tmp_path) -> None:
    """PIL names the BytesIO it read by its address ("cannot identify image file <_io.BytesIO object at 0x..>"):
    the detail names the file instead, so two builds write the same bytes."""
    good = _png(5)
    not_image = _write(tmp_path / "imgs" / "text.jpg", b"this is not an image\n")
    truncated = _write(tmp_path / "imgs" / "cut.png", good[: len(good) // 2])
    _write(tmp_path / "imgs" / "good.png", good)
    spec = [SourceSpec("imgs", "image_folder", "pretrain", tmp_path / "imgs", layout="flat")]
    build_manifest(spec, rejections_path=tmp_path / "first.jsonl")
    build_manifest(spec, rejections_path=tmp_path / "second.jsonl")
    first = (tmp_path / "first.jsonl").read_bytes()
    assert first == (tmp_path / "second.jsonl").read_bytes()
    lines = {line["location"]: line for line in map(json.loads, first.decode().splitlines())}
    assert set(lines) == {not_image, truncated} and not ADDRESS.search(first.decode())
    assert lines[not_image]["reason"] == decode.NOT_AN_IMAGE
    assert lines[not_image]["detail"] == f"{not_image}: cannot identify image file {not_image!r}"
    assert lines[truncated]["reason"] == decode.CORRUPT and lines[truncated]["detail"].startswith(f"{truncated}: ")


def test_stable_text_names_the_subject_and_drops_addresses() -> None:
    raw = "cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9e50> (<Foo object at 0xDEADbeef>)"
    assert stable_text(raw, "'x.jpg'") == "cannot identify image file 'x.jpg' ('x.jpg')"
    assert stable_text(raw) == "cannot identify image file <_io.BytesIO object> (<Foo object>)"
    assert stable_text("100x100 pixels, 0x1f flags") == "100x100 pixels, 0x1f flags"  # only addresses go

    class Odd(ValueError):
        pass

    exc = Odd(f"bad stream {io.BytesIO()!r}")
    assert exception_detail(exc) == "Odd: bad stream <_io.BytesIO object>"
    assert exception_detail(exc, "'a.png'", with_type=False) == "bad stream 'a.png'"


def test_a_plug_in_reader_s_detail_loses_its_address() -> None:
    scan = SourceScan()
    scan.reject("x.bin", "bad", f"cannot parse {io.BytesIO()!r}")
    assert list(scan.iter_rejections()) == [
        {"location": "x.bin", "reason": "bad", "detail": "cannot parse <_io.BytesIO object>"}
    ]
