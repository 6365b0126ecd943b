"""What a source reader gets, what it fills, and how ingestion finds it: the interface of every reader.

:class:`SourceSpec` says where a source's images are; the reader registered for its ``kind``
(:func:`register_source_kind`; the built-in ones are in :mod:`eva_pipeline.ingest.readers`) streams them into a
:class:`SourceScan`, which spills to disk past :data:`~eva_pipeline.ingest.spill.CHUNK_ROWS` items (memory flat in
the number of images, see :mod:`eva_pipeline.ingest.spill`) and records every rejected item with its reason.
"""

from __future__ import annotations

import json
import os
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from eva_pipeline.ingest.details import stable_text
from eva_pipeline.ingest.spill import current_chunk_rows, spill_file, unlink_all
from eva_pipeline.manifest import SPLITS

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
    matters for ``image_folder`` sources (see :data:`FOLDER_LAYOUTS`). ``classes``: the class names in label
    order, for integer labels (an image folder's are its class folders; without them a labelled source's names
    are "0", "1", ...: :mod:`eva_pipeline.ingest.write`).
    """

    name: str
    kind: str
    split: str
    images: str | os.PathLike[str]
    labels: str | os.PathLike[str] | None = None
    limit: int | None = None
    layout: str = "auto"
    decode_workers: int = 1  # threads decoding files / shards ahead of the in-order scan (not a cache setting)
    classes: Sequence[str] | None = None  # stored as a tuple

    def __post_init__(self) -> None:
        if not self.name or "#" in self.name or self.name != self.name.strip():
            raise ValueError(f"source name must be non-empty, without '#' or surrounding spaces, got {self.name!r}")
        if self.split not in SPLITS:
            raise ValueError(f"source {self.name!r}: split must be one of {SPLITS}, got {self.split!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or int(self.limit) != self.limit or self.limit < 1):
            raise ValueError(f"source {self.name!r}: limit must be a positive integer or None, got {self.limit!r}")
        if self.layout not in FOLDER_LAYOUTS:
            raise ValueError(f"source {self.name!r}: layout must be one of {FOLDER_LAYOUTS}, got {self.layout!r}")
        if (
            isinstance(self.decode_workers, bool)
            or int(self.decode_workers) != self.decode_workers
            or self.decode_workers < 1
        ):
            raise ValueError(
                f"source {self.name!r}: decode_workers must be a positive integer, got {self.decode_workers!r}"
            )
        if self.classes is not None:
            self._check_classes()

    def _check_classes(self) -> None:
        where = f"source {self.name!r}"
        if isinstance(self.classes, str):
            raise ValueError(f"{where}: 'classes' must be a list of names, got the string {self.classes!r}")
        object.__setattr__(self, "classes", tuple(self.classes))  # frozen: hashable, as the other fields
        assert self.classes is not None
        if self.kind == "image_folder":
            raise ValueError(
                f"{where}: an image_folder source's class names are its class folders, sorted (label i is the i-th "
                "folder); remove 'classes'"
            )
        if self.kind == "idx" and self.labels is None:
            raise ValueError(f"{where}: 'classes' names the labels, but the idx source has no labels file")
        if not self.classes or not all(isinstance(c, str) and c.strip() for c in self.classes):
            raise ValueError(f"{where}: 'classes' must be one or more non-empty names, got {list(self.classes)}")
        if repeated := sorted(c for c, n in Counter(self.classes).items() if n > 1):
            raise ValueError(f"{where}: class names must be unique, repeated: {repeated}")

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> SourceSpec:
        """Build from a parameters mapping (e.g. one entry of ``ingestion.sources``); unknown keys are an error."""
        allowed = set(cls.__dataclass_fields__)
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(f"source spec has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**dict(params))


#: Columns of a scan's spilled items (one Arrow IPC record batch per chunk).
SCAN_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("location", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("size_bytes", pa.int64()),
        pa.field("hash", pa.string()),
    ]
)


@dataclass(eq=False)
class SourceScan:
    """What a source reader found, item by item (after ``limit``), before de-duplication.

    Readers call :meth:`add` per accepted item and :meth:`reject` per unreadable one (with the reason), so that
    nothing is dropped silently. ``available`` is the number of items in the source before ``limit``; ``info`` is
    copied into the source's entry of the ingestion report (e.g. the class names of an image folder).

    The parallel lists (``locations``, ``labels``, ...) and ``rejections`` hold at most one chunk
    (:data:`~eva_pipeline.ingest.spill.CHUNK_ROWS`, or the build's ``chunk_rows``): when they fill up they are
    spilled to a temporary file (items: Arrow IPC, rejections: JSON lines) and emptied, so a scan of 14M images
    holds one chunk in memory.
    A plug-in reader may still append to the lists directly; :meth:`finish` spills them then. The report's
    per-reason counts and first :data:`REPORT_EXAMPLES` rejections are kept as the rejections go by.
    """

    available: int = 0
    locations: list[str] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    size_bytes: list[int] = field(default_factory=list)
    hashes: list[str | None] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    #: The most items or rejections held in the lists at once (a test hook: at most one chunk with add/reject).
    peak_buffered: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._chunk = current_chunk_rows()
        self._files: list[Path] = []
        self._finalizer = weakref.finalize(self, unlink_all, self._files)
        self._items_path: Path | None = None
        self._items_writer: pa.ipc.RecordBatchFileWriter | None = None
        self._rejections_path: Path | None = None
        self._rejections_fh: Any = None
        self._spilled_items = 0
        self._spilled_rejections = 0
        self._reasons: Counter[str] = Counter()
        self._examples: list[dict[str, Any]] = []
        self._finished = False

    # ------------------------------------------------------------------ the reader's API
    def add(
        self, location: str, label: int | None, width: int, height: int, size_bytes: int, digest: str | None
    ) -> None:
        """Record one accepted item."""
        self.locations.append(location)
        self.labels.append(None if label is None else int(label))
        self.widths.append(int(width))
        self.heights.append(int(height))
        self.size_bytes.append(int(size_bytes))
        self.hashes.append(digest)
        if len(self.locations) >= self._chunk:
            self._spill_items()

    def reject(self, location: str, reason: str, detail: str = "") -> None:
        """Record one unreadable item: ``reason`` is a stable code, ``detail`` the specifics (any memory address in
        it is dropped, so that the rejections list is the same on every run)."""
        self.rejections.append({"location": location, "reason": reason, "detail": stable_text(detail)})
        if len(self.rejections) >= self._chunk:
            self._spill_rejections()

    # ------------------------------------------------------------------ counts
    @property
    def items(self) -> int:
        """Accepted items so far."""
        return self._spilled_items + len(self.locations)

    @property
    def rejected(self) -> int:
        return self._spilled_rejections + len(self.rejections)

    @property
    def found(self) -> int:
        return self.items + self.rejected

    @property
    def rejection_reasons(self) -> dict[str, int]:
        """Count of every rejection reason, sorted by reason (complete after :meth:`finish`)."""
        return dict(sorted(self._reasons.items()))

    @property
    def rejected_examples(self) -> list[dict[str, Any]]:
        """The first :data:`REPORT_EXAMPLES` rejections (complete after :meth:`finish`)."""
        return list(self._examples)

    def check(self, name: str) -> None:
        """Readers are plug-ins: make sure the parallel lists line up before trusting them."""
        n = len(self.locations)
        lengths = {len(x) for x in (self.labels, self.widths, self.heights, self.size_bytes, self.hashes)}
        if lengths != {n}:
            raise RuntimeError(f"source {name!r}: reader returned misaligned item lists")

    # ------------------------------------------------------------------ spilling
    def _items_table(self, start: int, stop: int) -> pa.RecordBatch:
        try:
            return pa.record_batch(
                [
                    pa.array(self.locations[start:stop], pa.string()),
                    pa.array(self.labels[start:stop], pa.int64()),
                    pa.array(self.widths[start:stop], pa.int32()),
                    pa.array(self.heights[start:stop], pa.int32()),
                    pa.array(self.size_bytes[start:stop], pa.int64()),
                    pa.array(self.hashes[start:stop], pa.string()),
                ],
                schema=SCAN_SCHEMA,
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as exc:
            raise ValueError(f"reader returned an item that does not fit the manifest's columns: {exc}") from exc

    def _spill_items(self) -> None:
        if self._finished:
            raise RuntimeError("SourceScan: items added after the scan was finished")
        self.check("?")
        n = len(self.locations)
        self.peak_buffered = max(self.peak_buffered, n)
        if not n:
            return
        if self._items_writer is None:
            self._items_path = spill_file("scan-items-", ".arrow")
            self._files.append(self._items_path)
            self._items_writer = pa.ipc.new_file(str(self._items_path), SCAN_SCHEMA)
        for start in range(0, n, self._chunk):
            self._items_writer.write_batch(self._items_table(start, min(n, start + self._chunk)))
        self._spilled_items += n
        for values in (self.locations, self.labels, self.widths, self.heights, self.size_bytes, self.hashes):
            values.clear()

    def _account(self, rejections: list[dict[str, Any]]) -> None:
        self._reasons.update(r.get("reason", "") for r in rejections)
        room = REPORT_EXAMPLES - len(self._examples)
        if room > 0:
            self._examples.extend(rejections[:room])

    def _spill_rejections(self) -> None:
        if self._finished:
            raise RuntimeError("SourceScan: rejections added after the scan was finished")
        n = len(self.rejections)
        self.peak_buffered = max(self.peak_buffered, n)
        if not n:
            return
        self._account(self.rejections)
        if self._rejections_fh is None:
            self._rejections_path = spill_file("scan-rejections-", ".jsonl")
            self._files.append(self._rejections_path)
            self._rejections_fh = self._rejections_path.open("w", encoding="utf-8")
        self._rejections_fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rejections)
        self._spilled_rejections += n
        self.rejections.clear()

    def finish(self, name: str = "?") -> None:
        """The reader is done: check the lists, spill what exceeds one chunk, close the spill files."""
        if self._finished:
            return
        self.check(name)
        self.peak_buffered = max(self.peak_buffered, len(self.locations), len(self.rejections))
        if len(self.locations) > self._chunk or (self._items_writer is not None and self.locations):
            self._spill_items()
        if len(self.rejections) > self._chunk or (self._rejections_fh is not None and self.rejections):
            self._spill_rejections()
        else:
            self._account(self.rejections)  # stay in memory (less than a chunk), counted now
        self._close_spills()
        self._finished = True

    def _close_spills(self) -> None:
        if self._items_writer is not None:
            self._items_writer.close()
            self._items_writer = None
        if self._rejections_fh is not None:
            self._rejections_fh.close()
            self._rejections_fh = None

    # ------------------------------------------------------------------ reading back
    def iter_item_batches(self) -> Iterator[pa.RecordBatch]:
        """Every accepted item in scan order, in record batches of at most one chunk (:data:`SCAN_SCHEMA`)."""
        self.finish()
        if self._items_path is not None:
            with pa.OSFile(str(self._items_path), "rb") as fh:
                reader = pa.ipc.open_file(fh)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
        if self.locations:
            yield self._items_table(0, len(self.locations))

    def iter_rejections(self) -> Iterator[dict[str, Any]]:
        """Every rejection in scan order."""
        self.finish()
        if self._rejections_path is not None:
            with self._rejections_path.open(encoding="utf-8") as fh:
                for line in fh:
                    yield json.loads(line)
        yield from self.rejections

    def close(self) -> None:
        """Remove the spill files (the scan cannot be read back afterwards)."""
        self._close_spills()
        self._finalizer()


#: ``reader(spec)``, or ``reader(spec, units=UnitCache)`` for a reader that scans unit by unit through the
#: incremental scan cache (:mod:`eva_pipeline.ingest.scan_cache`); a reader without ``units`` is always read whole.
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


def source_reader(kind: str) -> SourceReader:
    """The reader registered for ``kind`` (KeyError if none: check :func:`source_kinds` first)."""
    return _SOURCE_READERS[kind]


def source_kinds() -> tuple[str, ...]:
    """Registered source kinds."""
    return tuple(sorted(_SOURCE_READERS))
