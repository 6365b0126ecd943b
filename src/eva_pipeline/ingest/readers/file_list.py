"""The ``file_list`` source kind: a UTF-8 text file of image paths, each with an optional integer label.

Relative paths are resolved against the list file's folder (so a relative list gives relative locations); blank
lines and ``#`` comment lines are skipped; a bad line, a repeated path and a missing file are rejections.
"""

from __future__ import annotations

import os
from pathlib import Path

from eva_pipeline.ingest.readers.common import UnitRunner, file_unit, no_labels_file
from eva_pipeline.ingest.scan import SourceScan, SourceSpec, register_source_kind
from eva_pipeline.ingest.scan_cache import UnitCache
from eva_pipeline.ingest.spill import StringSet

BAD_LINE = "bad line"
REPEATED = "repeated entry"


def parse_list_line(line: str) -> tuple[str, int | None]:
    """``"path"``, ``"path<TAB>label"`` or ``"path label"`` -> (path, label); raises ValueError on a bad label.

    With a TAB the path may contain spaces and the field after the last TAB must be an integer label; without
    one, a trailing whitespace-separated integer is the label (so ``"my photo.jpg"`` is a path without label).
    """
    if "\t" in line:
        path, _, label = line.rpartition("\t")
        path, label = path.strip(), label.strip()
        if not path:
            raise ValueError("no path before the TAB")
        try:
            return path, int(label)
        except ValueError:
            raise ValueError(f"label {label!r} is not an integer") from None
    parts = line.rsplit(None, 1)
    if len(parts) == 2:
        try:
            return parts[0], int(parts[1])
        except ValueError:
            pass
    return line, None


@register_source_kind("file_list")
def read_file_list(spec: SourceSpec, units: UnitCache | None = None) -> SourceScan:
    """A UTF-8 text file, one ``path[<TAB or space>label]`` per line; relative paths are resolved against the
    list file's folder; blank lines and ``#`` comment lines are skipped; a missing file is a rejection."""
    no_labels_file(spec)
    list_path = Path(spec.images)
    base = list_path.parent
    scan = SourceScan(available=0)
    seen = StringSet()  # in memory up to one chunk of lines, then on disk
    candidates = 0
    try:
        with (
            list_path.open(encoding="utf-8", errors="replace") as fh,
            UnitRunner(scan, units, spec.decode_workers) as runner,
        ):
            for lineno, raw in enumerate(fh, 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                candidates += 1
                if spec.limit is not None and candidates > spec.limit:
                    continue
                try:
                    path, label = parse_list_line(line)
                except ValueError as exc:
                    at, detail = f"{list_path.as_posix()}:{lineno}", f"{exc}: {line!r}"
                    runner.direct(lambda scan, at=at, d=detail: scan.reject(at, BAD_LINE, d))
                    continue
                location = path if os.path.isabs(path) else (base / path).as_posix()
                if not seen.add(location):
                    runner.direct(
                        lambda scan, loc=location, n=lineno: scan.reject(
                            loc, REPEATED, f"line {n} repeats an earlier line of {list_path}"
                        )
                    )
                    continue
                file_unit(runner, location, label)
    finally:
        seen.close()
    scan.available = candidates
    return scan
