"""The ``webdataset`` source kind: img2dataset-style tar shards, one sample per key, read with webdataset.

A sample's image is its first image member (:data:`_WDS_IMAGE_ORDER`), its label the integer in ``.cls`` when
present; its location is ``"shard.tar#member"``. Each shard is one unit of the scan cache. A shard that cannot be
read to its end is one ``corrupt shard`` rejection (the samples before the damage are kept). With ``limit``
reading stops after the first ``limit`` samples (``available_is_lower_bound`` in the report).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from eva_pipeline.ingest.decode import IMAGE_EXTENSIONS
from eva_pipeline.ingest.details import exception_detail
from eva_pipeline.ingest.readers.common import UNSUPPORTED_PATH, UnitRunner, ingest_item, no_labels_file
from eva_pipeline.ingest.scan import SourceScan, SourceSpec, register_source_kind
from eva_pipeline.ingest.scan_cache import UnitCache

NO_IMAGE = "no image in sample"
BAD_LABEL = "bad label"
CORRUPT_SHARD = "corrupt shard"

#: Preference among image members of one webdataset sample (first present wins).
_WDS_IMAGE_ORDER = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


def webdataset_shards(path: str | os.PathLike[str]) -> list[Path]:
    """A single ``.tar`` file, or the ``*.tar`` files of a folder in sorted order."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".tar")


def iter_tar_files(shard: Path, select: Any = None, errors: list[Exception] | None = None) -> Iterator[dict[str, Any]]:
    """The regular members of one tar shard as ``{"fname", "data", "__url__"}`` dicts, via webdataset.

    With ``errors`` a damaged shard ends the iteration normally and the exception is appended there, so that a
    grouping stage downstream still flushes the samples read before the damage; without it, it is raised.
    """
    from webdataset.tariterators import tar_file_iterator

    with shard.open("rb") as fh:
        try:
            for item in tar_file_iterator(fh, select_files=select):
                item["__url__"] = shard.as_posix()
                yield item
        except Exception as exc:
            if errors is None:
                raise
            errors.append(exc)


def _image_member(sample: dict[str, Any]) -> str | None:
    """The image extension of one sample (the first of :data:`_WDS_IMAGE_ORDER` present, any case)."""
    exts = {k.lower(): k for k in sample if not k.startswith("__")}
    for ext in _WDS_IMAGE_ORDER:
        if ext in exts:
            return exts[ext]
    for lower, ext in exts.items():  # e.g. "seg.png": a multi-part extension ending with an image one
        if f".{lower.rsplit('.', 1)[-1]}" in IMAGE_EXTENSIONS:
            return ext
    return None


@register_source_kind("webdataset")
def read_webdataset(spec: SourceSpec, units: UnitCache | None = None) -> SourceScan:
    """img2dataset-style shards: members ``<key>.jpg|png|webp`` (+ optional ``.txt``/``.json``/``.cls``) grouped
    into samples with webdataset; label from ``.cls`` when present. A shard that cannot be read to its end is
    one ``corrupt shard`` rejection (the samples before the damage are kept)."""
    no_labels_file(spec)
    shards = webdataset_shards(spec.images)
    if not shards:
        raise ValueError(f"no .tar shards in {spec.images}")
    if bad := [s.as_posix() for s in shards if "#" in s.as_posix()]:
        raise ValueError(f"shard paths must not contain '#': {bad}")
    scan = SourceScan(available=0)
    state = {"candidates": 0, "stopped": False}

    def done(meta: dict[str, Any]) -> None:
        state["candidates"] += meta["samples"]
        state["stopped"] = state["stopped"] or meta["stopped"]

    # With a limit, how much of a shard to read depends on the shards before it: read them one at a time.
    workers = spec.decode_workers if spec.limit is None else 1
    with UnitRunner(scan, units, workers) as runner:
        for shard in shards:
            if state["stopped"]:
                break
            remaining = None if spec.limit is None else spec.limit - state["candidates"]
            runner.unit(
                shard.as_posix(),
                [shard],
                lambda sub, shard=shard, remaining=remaining: _read_shard(sub, shard, remaining),
                reusable=lambda m, remaining=remaining: _shard_reusable(m, remaining),
                done=done,
            )
    candidates, stopped = state["candidates"], state["stopped"]
    scan.available = candidates
    scan.info["shards"] = len(shards)
    scan.info["available_is_lower_bound"] = stopped
    return scan


def _read_shard(scan: SourceScan, shard: Path, remaining: int | None) -> dict[str, Any]:
    """Ingest the samples of one shard, at most ``remaining`` of them; -> ``{"samples", "stopped", "quota"}``
    (``stopped``: a sample beyond ``remaining`` was seen, so reading stopped there)."""
    from webdataset.tariterators import group_by_keys

    shard_loc = shard.as_posix()
    errors: list[Exception] = []
    samples = 0
    stopped = False
    try:
        for sample in group_by_keys(iter_tar_files(shard, errors=errors), lcase=False):
            if remaining is not None and samples + 1 > remaining:
                stopped = True
                break
            samples += 1
            _ingest_sample(scan, shard_loc, sample)
    except Exception as exc:
        errors.append(exc)
    for exc in errors:
        scan.reject(shard_loc, CORRUPT_SHARD, exception_detail(exc, repr(shard_loc)))
    return {"samples": samples, "stopped": stopped, "quota": remaining}


def _shard_reusable(meta: dict[str, Any], remaining: int | None) -> bool:
    """A cached shard result holds for ``remaining``: read with the same quota, or read to its end within it."""
    if meta.get("quota") == remaining:
        return True
    return not meta["stopped"] and (remaining is None or meta["samples"] <= remaining)


def _ingest_sample(scan: SourceScan, shard_loc: str, sample: dict[str, Any]) -> None:
    key = sample["__key__"]
    ext = _image_member(sample)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        scan.reject(f"{shard_loc}#{key}", NO_IMAGE, f"members {members}")
        return
    member = f"{key}.{ext}"
    location = f"{shard_loc}#{member}"
    if "#" in member:
        scan.reject(location, UNSUPPORTED_PATH, "'#' in a member name makes the location ambiguous")
        return
    label = None
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError) as exc:
            scan.reject(location, BAD_LABEL, f"{key}.cls: {exception_detail(exc, with_type=False)}")
            return
    ingest_item(scan, location, label, sample[ext], location)
