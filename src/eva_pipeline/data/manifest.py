"""The image manifest: one row per image, whatever container it lives in, plus the ingestion that builds it.

Every later stage (teacher targets, pre-training, probing) reads images only through the manifest, so the
schema is written for large sources too: ``location`` is a plain file path, ``"path#index"`` for an item of an
array container (IDX), and later ``"shard.tar#member"``. The ``split`` column keeps probe images out of
pre-training; exact-duplicate detection by content hash keeps the same image from appearing in both.

Source kinds are looked up in a small registry (:func:`register_source_kind`), so new kinds ("image_folder",
"file_list", "webdataset") plug in without changing :func:`build_manifest` or its callers. The readers of
encoded images live in :mod:`eva_pipeline.data.sources`; every unreadable item is recorded as a rejection with
its reason (:mod:`eva_pipeline.data.decode`), never dropped silently nor replaced by another image.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from eva_pipeline.data.idx import EMBEDDED_DATA_DIR, read_idx
from eva_pipeline.data.scan_cache import UnitCache, cache_file, source_settings

#: What images are for. Probe images are held out: never used in pre-training.
SPLITS: tuple[str, ...] = ("pretrain", "probe")

#: Column order and types of a manifest on disk (parquet). ``content_hash`` is the sha1 hex of the item's raw
#: bytes (the encoded file, or the H*W*C pixel bytes of an array item); null where a source cannot afford hashing.
MANIFEST_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("location", pa.string(), nullable=False),
        pa.field("label", pa.int64(), nullable=True),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("size_bytes", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=True),
    ]
)
MANIFEST_COLUMNS: tuple[str, ...] = tuple(MANIFEST_SCHEMA.names)
#: ``content_hash`` may be absent from a manifest; every other column is required.
REQUIRED_COLUMNS: tuple[str, ...] = tuple(c for c in MANIFEST_COLUMNS if c != "content_hash")
#: The pandas dtypes of the same columns ("str": pandas' default string dtype).
MANIFEST_DTYPES: dict[str, str] = {
    "id": "str",
    "source": "str",
    "location": "str",
    "label": "Int64",
    "width": "int32",
    "height": "int32",
    "size_bytes": "int64",
    "split": "str",
    "content_hash": "str",
}
_STRING_COLUMNS = ("id", "source", "location", "split")
#: Columns that determine the pixels of the rows (not labels or splits): what a target cache must depend on.
PIXEL_DIGEST_COLUMNS: tuple[str, ...] = ("id", "location", "width", "height", "size_bytes", "content_hash")
#: How many rejected / duplicate items the report lists by name per source (all of them are counted).
REPORT_EXAMPLES: int = 20
#: Layouts of an ``image_folder`` source: decided from the tree, one class folder per label, or unlabelled.
FOLDER_LAYOUTS: tuple[str, ...] = ("auto", "class_folders", "flat")


@dataclass(frozen=True)
class SourceSpec:
    """One image source to ingest.

    ``kind`` names a registered reader ("idx" built in). ``images`` is the container or folder, ``labels`` an
    optional companion file, ``limit`` keeps only the first items (quick runs). Relative paths are stored as
    given, so a manifest built from the project root stays valid when the project moves. ``layout`` only
    matters for ``image_folder`` sources (see :data:`FOLDER_LAYOUTS`).
    """

    name: str
    kind: str
    split: str
    images: str | os.PathLike[str]
    labels: str | os.PathLike[str] | None = None
    limit: int | None = None
    layout: str = "auto"

    def __post_init__(self) -> None:
        if not self.name or "#" in self.name or self.name != self.name.strip():
            raise ValueError(f"source name must be non-empty, without '#' or surrounding spaces, got {self.name!r}")
        if self.split not in SPLITS:
            raise ValueError(f"source {self.name!r}: split must be one of {SPLITS}, got {self.split!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or int(self.limit) != self.limit or self.limit < 1):
            raise ValueError(f"source {self.name!r}: limit must be a positive integer or None, got {self.limit!r}")
        if self.layout not in FOLDER_LAYOUTS:
            raise ValueError(f"source {self.name!r}: layout must be one of {FOLDER_LAYOUTS}, got {self.layout!r}")

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> "SourceSpec":
        """Build from a parameters mapping (e.g. one entry of ``ingestion.sources``); unknown keys are an error."""
        allowed = {f for f in cls.__dataclass_fields__}
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(f"source spec has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**dict(params))


@dataclass
class SourceScan:
    """What a source reader found, item by item (after ``limit``), before de-duplication.

    Parallel lists, one entry per accepted item; ``rejections`` lists unreadable items with the reason, so that
    nothing is dropped silently. ``available`` is the number of items in the source before ``limit``. ``info``
    is copied into the source's entry of the ingestion report (e.g. the class names of an image folder).
    """

    available: int
    locations: list[str] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    size_bytes: list[int] = field(default_factory=list)
    hashes: list[str | None] = field(default_factory=list)
    rejections: list[dict[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def add(
        self, location: str, label: int | None, width: int, height: int, size_bytes: int, digest: str | None
    ) -> None:
        """Record one accepted item."""
        self.locations.append(location)
        self.labels.append(label)
        self.widths.append(int(width))
        self.heights.append(int(height))
        self.size_bytes.append(int(size_bytes))
        self.hashes.append(digest)

    def reject(self, location: str, reason: str, detail: str = "") -> None:
        """Record one unreadable item: ``reason`` is a stable code, ``detail`` the specifics."""
        self.rejections.append({"location": location, "reason": reason, "detail": detail})

    @property
    def found(self) -> int:
        return len(self.locations) + len(self.rejections)

    def check(self, name: str) -> None:
        """Readers are plug-ins: make sure the parallel lists line up before trusting them."""
        n = len(self.locations)
        lengths = {len(x) for x in (self.labels, self.widths, self.heights, self.size_bytes, self.hashes)}
        if lengths != {n}:
            raise RuntimeError(f"source {name!r}: reader returned misaligned item lists")


#: ``reader(spec)``, or ``reader(spec, units=UnitCache)`` for a reader that scans unit by unit through the
#: incremental scan cache (:mod:`eva_pipeline.data.scan_cache`); a reader without ``units`` is always read whole.
SourceReader = Callable[..., SourceScan]
_SOURCE_READERS: dict[str, SourceReader] = {}


def register_source_kind(kind: str) -> Callable[[SourceReader], SourceReader]:
    """Decorator: make ``reader`` handle ``SourceSpec(kind=kind, ...)`` in :func:`build_manifest`."""

    def decorate(reader: SourceReader) -> SourceReader:
        if kind in _SOURCE_READERS and _SOURCE_READERS[kind] is not reader:
            raise ValueError(f"source kind {kind!r} is already registered")
        _SOURCE_READERS[kind] = reader
        return reader

    return decorate


def source_kinds() -> tuple[str, ...]:
    """Registered source kinds."""
    return tuple(sorted(_SOURCE_READERS))


def _as_location_path(path: str | os.PathLike[str]) -> str:
    return Path(path).as_posix()


@register_source_kind("idx")
def _read_idx_source(spec: SourceSpec, units: UnitCache | None = None) -> SourceScan:
    """IDX images (N, H, W) or (N, H, W, C) uint8, optional IDX labels (N,); item ``i`` -> ``"path#i"``.
    The images + labels pair is one cache unit."""
    if units is None:
        return _scan_idx(spec)
    scan = SourceScan(available=0)
    paths = [spec.images] + ([] if spec.labels is None else [spec.labels])

    def read(sub: SourceScan) -> dict[str, Any]:
        whole = _scan_idx(spec)
        UnitCache.merge(sub, whole)
        return {"available": whole.available}

    scan.available = units.run(scan, _as_location_path(spec.images), paths, read)["available"]
    return scan


def _scan_idx(spec: SourceSpec) -> SourceScan:
    images = read_idx(spec.images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise ValueError(
            f"IDX images {spec.images}: expected uint8 of shape (N, H, W) or (N, H, W, 1|3), "
            f"got {images.dtype} {images.shape}"
        )
    available = int(images.shape[0])
    n = available if spec.limit is None else min(available, int(spec.limit))
    labels: list[int | None] = [None] * n
    if spec.labels is not None:
        raw = read_idx(spec.labels)
        if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"IDX labels {spec.labels}: expected a 1-D integer array, got {raw.dtype} {raw.shape}")
        if raw.shape[0] != available:
            raise ValueError(
                f"IDX labels {spec.labels}: {raw.shape[0]} labels for {available} images in {spec.images}"
            )
        labels = [int(v) for v in raw[:n]]
    height, width = int(images.shape[1]), int(images.shape[2])
    channels = 1 if images.ndim == 3 else int(images.shape[3])
    base = _as_location_path(spec.images)
    return SourceScan(
        available=available,
        locations=[f"{base}#{i}" for i in range(n)],
        labels=labels,
        widths=[width] * n,
        heights=[height] * n,
        size_bytes=[height * width * channels] * n,
        hashes=[hashlib.sha1(images[i]).hexdigest() for i in range(n)],  # C-contiguous rows: no copies
    )


def _check_paths(spec: SourceSpec) -> None:
    """Fail on a missing input before reading anything, naming every missing path of the source."""
    missing = [str(p) for p in (spec.images, spec.labels) if p is not None and not Path(p).exists()]
    if missing:
        raise FileNotFoundError(
            f"source {spec.name!r} ({spec.kind}): missing {', '.join(missing)} (cwd {Path.cwd()}; the embedded "
            f"demo data lives in {EMBEDDED_DATA_DIR}/ under the project root)"
        )


def build_manifest(
    specs: Sequence[SourceSpec],
    *,
    dedup: bool = True,
    rejections_path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Scan every source and return ``(manifest, report)``; raises before returning anything if a source is bad.

    With ``dedup`` an item whose content hash was already kept is dropped and counted. Probe sources are
    de-duplicated first, so an image present in both splits stays a probe image and never enters pre-training.
    ``report`` is JSON-ready: per source found / kept / rejected / duplicates (found == kept + rejected +
    duplicates), totals, per-split counts and the label histogram of each split. Each source lists its first
    :data:`REPORT_EXAMPLES` rejections and the count of every rejection reason; with ``rejections_path`` every
    rejection of every source is also written there as JSON lines (``source``, ``location``, ``reason``,
    ``detail``), and the report names the file.

    With ``cache_dir`` the scan is incremental (:mod:`eva_pipeline.data.scan_cache`): each unit of input (an image
    file, a shard, an IDX pair) whose path, size and mtime are unchanged is taken from the cache without being
    opened; the manifest and report are the same as without the cache, plus per source ``read`` / ``from_cache``
    (units) and ``removed_since_cache`` (cached units no longer present).
    """
    specs = list(specs)
    if not specs:
        raise ValueError("build_manifest: no sources given")
    names = Counter(s.name for s in specs)
    if dup_names := sorted(n for n, c in names.items() if c > 1):
        raise ValueError(f"source names must be unique (they prefix the ids), repeated: {dup_names}")
    if unknown := sorted({s.kind for s in specs} - set(_SOURCE_READERS)):
        raise ValueError(f"unknown source kind(s) {unknown}; registered: {list(source_kinds())}")
    for spec in specs:
        _check_paths(spec)

    scans: list[SourceScan] = []
    cache_reports: list[dict[str, Any]] = []
    for spec in specs:
        reader = _SOURCE_READERS[spec.kind]
        units = None
        if cache_dir is not None:
            units = UnitCache(cache_file(cache_dir, spec.name), source_settings(spec))
        try:
            if units is not None and "units" in inspect.signature(reader).parameters:
                scan = reader(spec, units=units)
            else:
                scan = reader(spec)
                if units is not None:
                    units.read = 1  # a reader without units: the whole source, read
            scan.check(spec.name)
        except ValueError as exc:
            if units is not None:
                units.abort()
            raise ValueError(f"source {spec.name!r} ({spec.kind}): {exc}") from exc
        except BaseException:
            if units is not None:
                units.abort()
            raise
        if units is not None:
            units.commit()
            cache_reports.append(units.report())
        else:
            cache_reports.append({})
        scans.append(scan)

    # Decide which items survive de-duplication: probe sources claim their images first.
    keep = [np.ones(len(scan.locations), dtype=bool) for scan in scans]
    duplicate_examples: list[list[dict[str, str]]] = [[] for _ in specs]
    if dedup:
        owner: dict[str, str] = {}
        for k in sorted(range(len(specs)), key=lambda k: (specs[k].split != "probe", k)):
            for i, digest in enumerate(scans[k].hashes):
                if digest is None:
                    continue
                item_id = f"{specs[k].name}/{i}"
                if digest in owner:
                    keep[k][i] = False
                    if len(duplicate_examples[k]) < REPORT_EXAMPLES:
                        duplicate_examples[k].append({"id": item_id, "duplicate_of": owner[digest]})
                else:
                    owner[digest] = item_id

    frames = []
    sources_report: dict[str, Any] = {}
    for spec, scan, kept, dup_examples, cache_report in zip(specs, scans, keep, duplicate_examples, cache_reports):
        idx = np.flatnonzero(kept)
        pick = lambda values: [values[i] for i in idx]  # noqa: E731
        frames.append(
            pd.DataFrame(
                {
                    "id": [f"{spec.name}/{i}" for i in idx],
                    "source": [spec.name] * len(idx),
                    "location": pick(scan.locations),
                    "label": pd.array(pick(scan.labels), dtype="Int64"),
                    "width": np.asarray(pick(scan.widths), dtype=np.int32),
                    "height": np.asarray(pick(scan.heights), dtype=np.int32),
                    "size_bytes": np.asarray(pick(scan.size_bytes), dtype=np.int64),
                    "split": [spec.split] * len(idx),
                    "content_hash": pick(scan.hashes),
                }
            )
        )
        if not len(idx):  # nothing kept: give the empty frame the manifest's dtypes (not float64)
            frames[-1] = frames[-1].astype(MANIFEST_DTYPES)
        sources_report[spec.name] = {
            "kind": spec.kind,
            "split": spec.split,
            "images": str(spec.images),
            "labels": None if spec.labels is None else str(spec.labels),
            "limit": spec.limit,
            "available": scan.available,
            "found": scan.found,
            "kept": int(len(idx)),
            "rejected": len(scan.rejections),
            "duplicates": int(len(kept) - len(idx)),
            "rejection_reasons": dict(sorted(Counter(r.get("reason", "") for r in scan.rejections).items())),
            "rejected_examples": scan.rejections[:REPORT_EXAMPLES],
            "duplicate_examples": dup_examples,
            **{key: value for key, value in scan.info.items() if key not in ("kind", "split", "found", "kept")},
            **cache_report,
        }
    # String columns keep pandas' inferred string dtype (nulls stay nulls); numeric ones are typed above.
    manifest = pd.concat(frames, ignore_index=True)
    validate_manifest(manifest)
    report = _report(manifest, sources_report, dedup)
    if rejections_path is not None:
        _write_rejections(Path(rejections_path), specs, scans)
        report["rejections_file"] = str(rejections_path)
    return manifest, report


def _write_rejections(path: Path, specs: Sequence[SourceSpec], scans: Sequence[SourceScan]) -> None:
    """Every rejection as one JSON line (written whole to a temporary file, then moved into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for spec, scan in zip(specs, scans):
            for rejection in scan.rejections:
                fh.write(json.dumps({"source": spec.name, **rejection}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _report(manifest: pd.DataFrame, sources: dict[str, Any], dedup: bool) -> dict[str, Any]:
    """Totals, per-split counts and per-split label histograms (string keys: the report is saved as JSON)."""
    totals = {key: sum(int(s[key]) for s in sources.values()) for key in ("found", "kept", "rejected", "duplicates")}
    splits: dict[str, Any] = {}
    histogram: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        rows = manifest[manifest["split"] == split]
        labels = rows["label"].dropna().astype("int64")
        names = sorted(rows["source"].unique())
        splits[split] = {"items": int(len(rows)), "labelled": int(len(labels)), "sources": names}
        histogram[split] = {str(k): int(v) for k, v in sorted(Counter(labels.tolist()).items())}
    return {"dedup": dedup, "sources": sources, "totals": totals, "splits": splits, "label_histogram": histogram}


def validate_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Check columns, dtypes, unique ids and locations, split values and probe/pretrain leakage; returns ``df``.

    All problems are collected into one ValueError, so a bad manifest is fixed in one round.
    """
    errors: list[str] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest is missing columns {missing}; expected {list(MANIFEST_COLUMNS)}")
    for col in _STRING_COLUMNS + (("content_hash",) if "content_hash" in df.columns else ()):
        series = df[col]
        if not (pd.api.types.is_string_dtype(series.dtype) or series.dtype == object):
            errors.append(f"column {col!r} must hold strings, has dtype {series.dtype}")
            continue
        values = series.dropna()
        if not values.map(lambda v: isinstance(v, str)).all():
            errors.append(f"column {col!r} holds non-string values")
        if col != "content_hash" and (len(values) != len(series) or (values == "").any()):
            errors.append(f"column {col!r} has missing or empty values")
    if str(df["label"].dtype) not in ("Int64", "int64"):
        errors.append(f"column 'label' must be Int64 (nullable integer), has dtype {df['label'].dtype}")
    for col, want in (("width", "int32"), ("height", "int32"), ("size_bytes", "int64")):
        if str(df[col].dtype) != want:
            errors.append(f"column {col!r} must be {want}, has dtype {df[col].dtype}")
        elif col != "size_bytes" and (df[col] <= 0).any():
            errors.append(f"column {col!r} has non-positive values")
        elif col == "size_bytes" and (df[col] < 0).any():
            errors.append("column 'size_bytes' has negative values")
    for col in ("id", "location"):
        dupes = df[col][df[col].duplicated()].unique()
        if len(dupes):
            errors.append(f"{len(dupes)} duplicate {col}(s), e.g. {list(dupes[:5])}")
    bad_splits = sorted(set(df["split"].dropna().unique()) - set(SPLITS))
    if bad_splits:
        errors.append(f"unknown split value(s) {bad_splits}; allowed: {list(SPLITS)}")
    if "content_hash" in df.columns:
        hashes = df[["content_hash", "split"]].dropna()
        probe = set(hashes.loc[hashes["split"] == "probe", "content_hash"])
        leaked = hashes.loc[(hashes["split"] != "probe") & hashes["content_hash"].isin(probe)]
        if len(leaked):
            errors.append(f"{len(leaked)} pre-training image(s) are also probe images (same content_hash)")
    if errors:
        raise ValueError("invalid manifest:\n  - " + "\n  - ".join(errors))
    return df


def select_split(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of one split in manifest order, with a fresh 0..n-1 index (row i <-> target row i)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return manifest[manifest["split"] == split].reset_index(drop=True)


def manifest_digest(manifest: pd.DataFrame, columns: Sequence[str] = PIXEL_DIGEST_COLUMNS) -> str:
    """sha256 hex of the given columns, row order included: a stable key for caches derived from the images.

    By default only the columns that determine pixels count, so relabelling does not invalidate teacher targets.
    Columns absent from the manifest are skipped (e.g. ``content_hash``).
    """
    h = hashlib.sha256()
    cols = [c for c in columns if c in manifest.columns]
    h.update(("\x1f".join(cols) + f"\x1e{len(manifest)}\x1e").encode())
    for col in cols:
        values = manifest[col].astype(object).where(manifest[col].notna(), None)
        h.update(("\x1f".join("\x00" if v is None else str(v) for v in values) + "\x1e").encode())
    return h.hexdigest()


# Built-in readers of encoded images ("image_folder", "file_list", "webdataset") register themselves on import.
from eva_pipeline.data import sources as _sources  # noqa: E402,F401  (after the registry exists: circular import)
