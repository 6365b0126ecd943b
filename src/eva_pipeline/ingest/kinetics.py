"""Kinetics-400/600/700 as users have them (annotation CSVs + downloaded clips) -> clip manifests and Kinetics-722.

EVA's video recipe (the public ``EVA-01/video/README.md`` and ``notebooks/build_file_list.ipynb``) fine-tunes on
Kinetics-722 first: the training clips of K400, K600 and K700 merged, de-duplicated, with every video that is in a
validation set removed, and the class names unified (722 = the 700 of K700 + 22 that only K400/K600 have). Then it
fine-tunes on each version with the K722 head rows picked by a class mapping. :func:`build_k722` makes all of that
one data product from the CSVs and the clip folders:

- the clip manifest: one row per (dataset, split, clip), datasets ``"k722"`` (train, validate) and each version
  (train, validate, test), with the probed frame count, fps and size of the clip file used;
- the rejections: every listed clip that is not in a dataset and why (missing file, unreadable, too short, a label
  conflict, leakage of a held-out video); a missing or bad clip is listed, never silently replaced (K722 may take
  the same clip from another version that has a good copy: the first version's rejection still lists it);
- the class mapping (:func:`k722_class_mapping`): K722's classes and, per version, the K722 index of each of its
  classes, saved as JSON next to the manifest (:func:`write_class_mapping`);
- the report: per version and for K722, counts that add up (see :func:`build_k722`).

Clips are probed through an injected ``probe(path, min_frames)`` (the project's is
``eva_pipeline.ingest.video.probe_video``), so nothing here decodes video and the tests run on fake probes. The
public notebook takes class names from folder names and keeps clips whose decoder opens; here the annotation CSVs
are the truth, files are found by an index of the clip folders (:class:`ClipLocator`), and each file is probed once.
Other differences, on purpose: the notebook de-duplicates K722 by video (``youtube_id``), here by clip (two segments
of one video are two clips; leakage is still judged by video); the notebook never applies its K400 leakage filter
(it prints the count twice), here every version's train split loses the videos of its own validate/test split.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from eva_pipeline.config import KINETICS_ALIASES
from eva_pipeline.fileio import replace_atomically
from eva_pipeline.ingest.details import exception_detail

#: The splits of a Kinetics version, in manifest order; validate and test are held out.
SPLITS: tuple[str, ...] = ("train", "validate", "test")
HELD_OUT_SPLITS: tuple[str, ...] = ("validate", "test")
#: Other spellings of a split in the CSVs' ``split`` column and in ``VersionSource.csvs`` (K400's files say "val").
SPLIT_SYNONYMS: Mapping[str, str] = {"val": "validate", "valid": "validate", "validation": "validate"}
#: Folder names tried for a split under a clip root, in order (``videos_train``/``videos_val``: mmaction2's layout).
SPLIT_FOLDERS: Mapping[str, tuple[str, ...]] = {
    "train": ("train", "videos_train"),
    "validate": ("validate", "val", "valid", "validation", "videos_val"),
    "test": ("test", "videos_test"),
}
#: Clip file extensions, in order of preference when one clip exists with several (compared lower-case).
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".mkv", ".webm", ".avi")
#: The columns every annotation CSV needs (a test split's may lack ``label``); others (K400's ``is_cc``) are ignored.
REQUIRED_COLUMNS: tuple[str, ...] = ("label", "youtube_id", "time_start", "time_end", "split")
#: The dataset name of the merged product in the manifest.
K722: str = "k722"


# Rejection reasons (stable codes). A probe's own reasons ("unreadable", "no_video_stream", "zero_length",
# "too_short", "corrupt" for eva_pipeline.ingest.video) are recorded as they come.
MISSING_FILE = "missing_file"
UNREADABLE = "unreadable"
TOO_SHORT = "too_short"
LABEL_CONFLICT = "label_conflict"
SPLIT_CONFLICT = "split_conflict"
LEAKAGE = "leakage"

MANIFEST_COLUMNS: tuple[str, ...] = (
    "dataset", "split", "clip_id", "youtube_id", "time_start", "time_end", "label", "label_name", "source", "path",
    "num_frames", "fps", "width", "height",
)  # fmt: skip
REJECTION_COLUMNS: tuple[str, ...] = ("dataset", "split", "clip_id", "path", "reason", "detail")

_T = TypeVar("_T")
_R = TypeVar("_R")
_EXAMPLES = 5  # how many offending rows an error message lists


class VideoInfoLike(Protocol):
    """What a probe returns (``eva_pipeline.ingest.video.VideoInfo`` is one)."""

    @property
    def num_frames(self) -> int: ...
    @property
    def fps(self) -> float: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...


#: ``probe(path, min_frames) -> info``; raises an exception with a ``reason`` attribute (or a ValueError/OSError)
#: for a clip that cannot be used.
Probe = Callable[[Path, int], VideoInfoLike]


@dataclass(frozen=True)
class VersionSource:
    """One Kinetics version as it lies on disk: its annotation CSVs per split and the root of its clips.

    ``csvs`` maps a split (``train``, ``validate``/``val``, ``test``) to its CSV; a version may lack some splits.
    ``classes``, when given (e.g. the official label map), is the version's class list: a CSV label outside it is
    an error, and classes without clips still count (so K722 has its 722 classes on a partial download); without
    it the classes are the labels found in the CSVs. Either way they are ordered as the official label maps are:
    sorted by their own names.
    """

    name: str
    csvs: Mapping[str, Path]
    clip_root: Path
    classes: Sequence[str] | None = None

    @classmethod
    def from_folder(
        cls,
        name: str,
        csv_dir: str | os.PathLike[str],
        clip_root: str | os.PathLike[str],
        classes: Sequence[str] | None = None,
    ) -> VersionSource:
        """The CSVs of one folder: ``train.csv``, ``validate.csv`` (or ``val.csv``), ``test.csv``, those present."""
        csv_dir = Path(csv_dir)
        names = {"train": ("train.csv",), "validate": ("validate.csv", "val.csv"), "test": ("test.csv",)}
        csvs = {}
        for split, candidates in names.items():
            found = next((csv_dir / n for n in candidates if (csv_dir / n).is_file()), None)
            if found is not None:
                csvs[split] = found
        if not csvs:
            raise FileNotFoundError(
                f"Kinetics version {name!r}: no annotation CSV in {csv_dir} (expected train.csv, validate.csv or "
                "val.csv, test.csv: the files of the official release)"
            )
        return cls(name, csvs, Path(clip_root), classes)


@dataclass(frozen=True)
class K722Build:
    """What :func:`build_k722` makes: see its docstring for the columns and the report."""

    manifest: pd.DataFrame
    rejections: pd.DataFrame
    mapping: dict[str, Any]
    report: dict[str, Any]


# ------------------------------------------------------------------------------------------------ annotation CSVs
def normalise_split(value: str, where: str) -> str:
    """``"val"`` -> ``"validate"`` etc.; an unknown split is an error naming ``where``."""
    split = SPLIT_SYNONYMS.get(value, value)
    if split not in SPLITS:
        raise ValueError(f"{where}: unknown split {value!r}; expected one of train, validate (or val), test")
    return split


def _whole_seconds(frame: pd.DataFrame, column: str, path: Path) -> pd.Series:
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() | (values < 0) | (values != np.floor(values))
    if bad.any():
        rows = np.flatnonzero(bad.to_numpy())[:_EXAMPLES]
        shown = ", ".join(f"line {r + 2}: {frame[column].iloc[r]!r}" for r in rows)  # +2: header, 1-based
        raise ValueError(
            f"{path}: column {column!r} must hold whole non-negative seconds; {int(bad.sum())} bad ({shown})"
        )
    return values.astype(np.int64)


def clip_ids(youtube_id: pd.Series, time_start: pd.Series, time_end: pd.Series) -> pd.Series:
    """``"<youtube_id>_<time_start:06d>_<time_end:06d>"``: the file stem the Kinetics downloaders write."""
    return youtube_id + "_" + time_start.astype(str).str.zfill(6) + "_" + time_end.astype(str).str.zfill(6)


def read_annotations(path: str | os.PathLike[str], split: str) -> pd.DataFrame:
    """One annotation CSV of ``split`` -> columns split, youtube_id, time_start, time_end (int64), label (str, ``""``
    when unlabelled), clip_id, in file order.

    Errors name the file: a missing column (only a test CSV may lack ``label``), a row of another or unknown split,
    an empty youtube_id, a train/validate row without label, a time that is not whole seconds.
    """
    path = Path(path)
    split = normalise_split(split, f"annotation CSV {path}")
    if not path.is_file():
        raise FileNotFoundError(f"Kinetics annotation CSV not found: {path} (check the version's csvs / csv_dir)")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")  # -sig: a BOM is no column
    frame.columns = [str(c).strip() for c in frame.columns]
    required = [c for c in REQUIRED_COLUMNS if not (c == "label" and split == "test")]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing} (found {list(frame.columns)}); a Kinetics annotation CSV needs "
            f"{list(REQUIRED_COLUMNS)}, and only a test split may lack 'label'"
        )
    for column in frame.columns:
        frame[column] = frame[column].str.strip()
    splits = frame["split"].map(lambda s: SPLIT_SYNONYMS.get(s, s))
    wrong = splits != split
    if wrong.any():
        values = sorted(set(frame["split"][wrong]))
        rows = np.flatnonzero(wrong.to_numpy())[:_EXAMPLES] + 2
        raise ValueError(
            f"{path}: given as the {split} CSV, but column 'split' holds {values} on {int(wrong.sum())} row(s) "
            f"(lines {rows.tolist()}); splits are train, validate (or val), test, one CSV per split"
        )
    labels = frame["label"] if "label" in frame.columns else pd.Series("", index=frame.index, dtype=object)
    for column, allowed_empty in (("youtube_id", False), ("label", split == "test")):
        values = frame["youtube_id"] if column == "youtube_id" else labels
        empty = values == ""
        if empty.any() and not allowed_empty:
            rows = np.flatnonzero(empty.to_numpy())[:_EXAMPLES] + 2
            raise ValueError(f"{path}: {int(empty.sum())} row(s) without {column} (lines {rows.tolist()})")
    start = _whole_seconds(frame, "time_start", path)
    end = _whole_seconds(frame, "time_end", path)
    out = pd.DataFrame(
        {"split": split, "youtube_id": frame["youtube_id"], "time_start": start, "time_end": end, "label": labels}
    )
    out["clip_id"] = clip_ids(out["youtube_id"], start, end)
    return out.reset_index(drop=True)


def _read_version(source: VersionSource) -> pd.DataFrame:
    frames = []
    seen: dict[str, Path] = {}
    for key, csv in source.csvs.items():
        split = normalise_split(str(key), f"Kinetics version {source.name!r}, csvs")
        if split in seen:
            raise ValueError(f"Kinetics version {source.name!r}: two CSVs for split {split!r}: {seen[split]}, {csv}")
        seen[split] = Path(csv)
    for split in SPLITS:  # manifest order, whatever the order of the mapping
        if split in seen:
            frames.append(read_annotations(seen[split], split))
    if not frames:
        raise ValueError(f"Kinetics version {source.name!r}: no annotation CSV given")
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------------ class mapping
def _check_aliases(aliases: Mapping[str, str]) -> None:
    for old, new in aliases.items():
        if new in aliases and aliases[new] != new:
            raise ValueError(
                f"class aliases chain: {old!r} -> {new!r} -> {aliases[new]!r}; map each old name to its final name"
            )


def k722_class_mapping(
    version_classes: Mapping[str, Iterable[str]], aliases: Mapping[str, str] = KINETICS_ALIASES
) -> dict[str, Any]:
    """The merged classes and, per version, the merged index of each of its classes (JSON-ready).

    -> ``{"k722_classes": [...], "versions": {v: {"classes": [...], "k722_index": [...]}}, "aliases": {...}}``.
    Each version's classes are sorted by their own names (the official label maps' order: Python's ``sorted``
    reproduces the public lists, upper-case "American" included); the merged classes are the sorted union of the
    names after ``aliases``; ``k722_index[i]`` is the merged index of the version's i-th class, so
    ``logits_k722[..., k722_index]`` are the version's logits in its own order (the head rows the public code picks
    with ``k722_to_k{400,600,700}_mapping.npy``). Two classes of one version that alias to one name are an error.
    """
    _check_aliases(aliases)
    own: dict[str, list[str]] = {}
    for version, classes in version_classes.items():
        names = sorted({str(c) for c in classes})
        merged: dict[str, str] = {}
        for name in names:
            target = aliases.get(name, name)
            if target in merged:
                raise ValueError(
                    f"Kinetics version {version!r} has both {merged[target]!r} and {name!r}, which the class aliases "
                    f"merge into {target!r}; an alias renames a class across versions, not two classes of one"
                )
            merged[target] = name
        own[version] = names
    k722_classes = sorted({aliases.get(name, name) for names in own.values() for name in names})
    index = {name: i for i, name in enumerate(k722_classes)}
    versions = {
        v: {"classes": names, "k722_index": [index[aliases.get(n, n)] for n in names]} for v, names in own.items()
    }
    return {"k722_classes": k722_classes, "versions": versions, "aliases": dict(sorted(aliases.items()))}


def mapping_arrays(mapping: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Version -> int64 array of the K722 index of each of its classes (index K722 logits with it)."""
    return {v: np.asarray(m["k722_index"], dtype=np.int64) for v, m in mapping["versions"].items()}


def write_class_mapping(path: str | os.PathLike[str], mapping: Mapping[str, Any]) -> Path:
    """The mapping as JSON (UTF-8, class names as written), replaced atomically."""

    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(mapping, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    return replace_atomically(path, write)


def read_class_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A mapping written by :func:`write_class_mapping`, checked (lengths agree, indices in range, names match)."""
    path = Path(path)
    mapping = json.loads(path.read_text(encoding="utf-8"))
    try:
        k722_classes = list(mapping["k722_classes"])
        versions = dict(mapping["versions"])
        aliases = dict(mapping.get("aliases", {}))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a Kinetics class mapping (needs k722_classes and versions): {exc}") from exc
    for v, m in versions.items():
        classes, index = list(m["classes"]), list(m["k722_index"])
        bad = [
            (c, i)
            for c, i in zip(classes, index, strict=False)
            if not (0 <= i < len(k722_classes)) or k722_classes[i] != aliases.get(c, c)
        ]
        if len(classes) != len(index) or bad:
            raise ValueError(
                f"{path}: version {v!r} has {len(classes)} classes and {len(index)} indices, "
                f"mismatched (class, index) pairs {bad[:_EXAMPLES]}"
            )
    return mapping


# ------------------------------------------------------------------------------------------------ clip files
class ClipLocator:
    """Finds clip files under one clip root from listings of its folders (one ``os.scandir`` per folder, on first
    use), not one filesystem lookup per clip: Kinetics has 0.65M clips.

    For a clip of ``split`` labelled ``label`` (the version's own class name) the folders are tried in this order,
    the first holding ``<clip_id><ext>`` wins (``ext`` in :data:`VIDEO_EXTENSIONS`, preferred in that order):

    1. ``<root>/<split folder>/<label folder>/``: the downloaders' layout (label folder: the name as written, then
       with spaces as underscores, mmaction2's ``rename_classnames.sh``);
    2. ``<root>/<split folder>/``: flat per split (unlabelled test clips);
    3. ``<root>/``: all clips in one folder.

    Split folders are tried in the order of :data:`SPLIT_FOLDERS` (``validate`` then ``val``, ...). Paths are
    strings under the root made absolute (lexically): a million ``Path`` objects would cost more than the listing.
    """

    def __init__(self, root: str | os.PathLike[str], extensions: Sequence[str] = VIDEO_EXTENSIONS) -> None:
        self.root = os.path.abspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"Kinetics clip root not found (or not a folder): {self.root}")
        self._rank = {ext.lower(): i for i, ext in enumerate(extensions)}
        self._listings: dict[str, dict[str, tuple[int, str]]] = {}
        self._folders: dict[tuple[str, str], tuple[str, ...]] = {}

    def _listing(self, folder: str) -> dict[str, tuple[int, str]]:
        listing = self._listings.get(folder)
        if listing is None:
            listing = {}
            try:
                with os.scandir(os.path.join(self.root, folder)) as entries:
                    for entry in entries:
                        stem, dot, ext = entry.name.rpartition(".")
                        rank = self._rank.get("." + ext.lower()) if dot else None
                        if rank is None or not entry.is_file():
                            continue
                        if stem not in listing or rank < listing[stem][0]:
                            listing[stem] = (rank, entry.name)
            except (FileNotFoundError, NotADirectoryError):
                pass
            self._listings[folder] = listing
        return listing

    def folders(self, split: str, label: str) -> tuple[str, ...]:
        """The folders (relative to the root, posix; ``""`` is the root) tried for a clip, in order."""
        key = (split, label)
        folders = self._folders.get(key)
        if folders is None:
            label_folders = list(dict.fromkeys([label, label.replace(" ", "_")])) if label else []
            nested = [f"{s}/{lf}" for s in SPLIT_FOLDERS[split] for lf in label_folders]
            folders = (*nested, *SPLIT_FOLDERS[split], "")
            self._folders[key] = folders
        return folders

    def locate(self, clip_id: str, split: str, label: str) -> str | None:
        """The clip's file (an absolute path), or None when no tried folder holds it."""
        for folder in self.folders(split, label):
            hit = self._listing(folder).get(clip_id)
            if hit is not None:
                return os.path.join(self.root, folder, hit[1])
        return None

    def missing_detail(self, clip_id: str, split: str, label: str) -> str:
        """Where a missing clip was looked for, for the rejection's detail (the tried folders that exist)."""
        exts = ",".join(e.lstrip(".") for e in self._rank)
        folders = self.folders(split, label)
        existing = [f or "." for f in folders if os.path.isdir(os.path.join(self.root, f))]
        return (
            f"no {clip_id}.{{{exts}}} under {Path(self.root).as_posix()}: not in the layout folders there {existing} "
            f"(the downloaders' layout is {folders[0]}/)"
        )


# ------------------------------------------------------------------------------------------------ probing
class ProbeResult(NamedTuple):
    """One probed clip: its frame count, fps and size, or (``reason`` not empty) why it cannot be used."""

    num_frames: int
    fps: float
    width: int
    height: int
    reason: str  # "" when usable
    detail: str


def _probe_one(probe: Probe, path: str | os.PathLike[str], min_frames: int) -> ProbeResult:
    try:
        info = probe(Path(path), min_frames)
    except Exception as exc:  # narrowed just below: only "cannot use this clip" errors are kept
        reason = getattr(exc, "reason", None)
        if not (isinstance(reason, str) and reason):
            if not isinstance(exc, (ValueError, OSError)):
                raise  # a bug in the probe, not a bad clip
            reason = UNREADABLE
        detail = exception_detail(exc)  # no memory address: the rejections are a DVC-tracked output
        return ProbeResult(-1, float("nan"), -1, -1, reason, detail)
    frames = int(info.num_frames)
    if frames < min_frames:
        return ProbeResult(
            -1, float("nan"), -1, -1, TOO_SHORT, f"{frames} frame(s), fewer than min_frames={min_frames}"
        )
    return ProbeResult(frames, float(info.fps), int(info.width), int(info.height), "", "")


def _map_in_order(fn: Callable[[_T], _R], items: Sequence[_T], workers: int) -> Iterator[_R]:
    """``map(fn, items)`` on ``workers`` threads, results in input order; at most ``4 * workers`` in flight, so a
    0.65M-clip pass holds no queue of 0.65M futures."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def probe_clips(
    paths: Sequence[str | os.PathLike[str]], probe: Probe, min_frames: int = 1, workers: int = 8, progress: bool = False
) -> list[ProbeResult]:
    """Each path probed once (call with distinct paths), results in input order; nothing decoded is kept."""
    out: list[ProbeResult] = []
    with tqdm(total=len(paths), unit="clip", desc="probe clips", disable=not progress) as bar:
        for result in _map_in_order(lambda p: _probe_one(probe, p, min_frames), paths, workers):
            out.append(result)
            bar.update()
    return out


# ------------------------------------------------------------------------------------------------ the build
def _display_path(path: str | None, prefix: str | None) -> str | None:
    """An absolute path -> posix, relative when it starts with ``prefix`` (a folder + separator); lexical, cheap."""
    if path is None:
        return None
    if prefix is not None and path.startswith(prefix):
        path = path[len(prefix) :]
    return path if os.sep == "/" else path.replace(os.sep, "/")


def _joined(keys: Iterable[str], texts: Iterable[str]) -> dict[str, str]:
    """key -> its texts joined with "; " (in order): the detail of a clip listed several times."""
    out: dict[str, list[str]] = {}
    for key, text in zip(keys, texts, strict=True):
        out.setdefault(key, []).append(text)
    return {key: "; ".join(texts) for key, texts in out.items()}


def _rejected(dataset: str, rows: pd.DataFrame, reason: Any, detail: Any) -> pd.DataFrame:
    def values(x: Any) -> Any:
        return x.to_numpy() if isinstance(x, pd.Series) else x

    path = rows["path"].to_numpy() if "path" in rows else None
    return pd.DataFrame(
        {
            "dataset": dataset,
            "split": rows["split"].to_numpy(),
            "clip_id": rows["clip_id"].to_numpy(),
            "path": path,
            "reason": values(reason),
            "detail": values(detail),
        },
        columns=list(REJECTION_COLUMNS),
    )


def _ordered(frame: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Rows by dataset (k722, then the versions as given), split (train, validate, test), clip_id; ties kept."""
    rank = {K722: 0, **{name: i + 1 for i, name in enumerate(names)}}
    keys = frame.assign(
        _dataset=frame["dataset"].map(rank), _split=frame["split"].map({s: i for i, s in enumerate(SPLITS)})
    )
    keys = keys.sort_values(["_dataset", "_split", "clip_id"], kind="stable")
    return keys.drop(columns=["_dataset", "_split"]).reset_index(drop=True)


def _within_version(table: pd.DataFrame) -> tuple[pd.DataFrame, int, pd.DataFrame]:
    """Rows repeated in a version's CSVs count once (-> duplicates); a clip listed in two splits or with two labels
    is dropped, all its rows rejected. -> (rows, number of duplicates, rejections)."""
    repeated = table.duplicated(["clip_id", "split", "label"])
    table = table[~repeated]
    clash = table["clip_id"].duplicated(keep=False)
    rows = table[clash]
    listed = _joined(rows["clip_id"], [f"{s} {lab!r}" for s, lab in zip(rows["split"], rows["label"], strict=True)])
    splits = rows.groupby("clip_id")["split"].transform("nunique")
    reason = np.where(splits > 1, SPLIT_CONFLICT, LABEL_CONFLICT)
    detail = ["listed as " + listed[c] for c in rows["clip_id"]]
    return table[~clash].reset_index(drop=True), int(repeated.sum()), _rejected("", rows, reason, detail)


def _version_fates(
    source: VersionSource, table: pd.DataFrame, prefix: str | None
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """One version's clips before probing: duplicates and conflicts out, own leakage marked, files found.

    -> (rows with ``reason`` ``""`` (to probe), ``leakage`` or ``missing_file`` and their ``detail``, ``file``,
    ``path``; the conflict rejections; the report's counts so far)."""
    rows, duplicates, conflicts = _within_version(table)
    rows["reason"] = ""
    rows["detail"] = ""
    held_out = set(table.loc[table["split"].isin(HELD_OUT_SPLITS), "youtube_id"])  # as listed, files or not
    leak = (rows["split"] == "train") & rows["youtube_id"].isin(held_out)
    rows.loc[leak, "reason"] = LEAKAGE
    rows.loc[leak, "detail"] = f"video also in the validate/test split of {source.name}"
    locator = ClipLocator(source.clip_root)
    where = list(zip(rows["clip_id"], rows["split"], rows["label"], strict=True))
    files = [locator.locate(*clip) for clip in where]
    missing = np.array([f is None for f in files], dtype=bool) & ~leak.to_numpy()
    paths = [
        _display_path(os.path.join(locator.root, locator.folders(s, lab)[0], c + VIDEO_EXTENSIONS[0]), prefix)
        if gone
        else _display_path(f, prefix)
        for (c, s, lab), f, gone in zip(where, files, missing, strict=True)
    ]
    rows["file"] = pd.Series(files, index=rows.index, dtype=object)
    rows["path"] = pd.Series(paths, index=rows.index, dtype=object)
    rows.loc[missing, "reason"] = MISSING_FILE
    rows.loc[missing, "detail"] = [
        locator.missing_detail(*clip) for clip, gone in zip(where, missing, strict=True) if gone
    ]
    counts = {
        "csvs": {str(s): Path(p).as_posix() for s, p in source.csvs.items()},
        "clip_root": Path(source.clip_root).as_posix(),
        "clips_listed": len(table),
        "clips_listed_by_split": {s: int((table["split"] == s).sum()) for s in SPLITS},
        "duplicates": duplicates,
        "conflicts": len(conflicts),
        "leakage_removed": int(leak.sum()),
        "found": int(len(rows) - leak.sum() - missing.sum()),
        "missing_files": int(missing.sum()),
    }
    return rows, conflicts.assign(dataset=source.name), counts


def _merge_split(
    split: str,
    fates: Mapping[str, pd.DataFrame],
    aliases: Mapping[str, str],
    held_out_videos: Mapping[str, set[str]],
    report_versions: dict[str, dict[str, Any]],
) -> tuple[pd.DataFrame, list[pd.DataFrame], dict[str, Any]]:
    """K722's ``split``: the versions' clips of that split as one set of clips. -> (chosen rows, rejections,
    report section); see :func:`build_k722`."""
    listed = pd.concat(
        [rows[rows["split"] == split].assign(version=v, rank=i) for i, (v, rows) in enumerate(fates.items())],
        ignore_index=True,
    )
    listed["merged"] = listed["label"].map(lambda name: aliases.get(name, name))
    listed = listed.sort_values(["clip_id", "rank"], kind="stable").reset_index(drop=True)
    first = ~listed["clip_id"].duplicated()
    rejections = []
    section: dict[str, Any] = {"candidates": int(first.sum())}

    clash = listed.groupby("clip_id")["merged"].transform("nunique") > 1
    told = _joined(
        listed.loc[clash, "clip_id"],
        [f"{v}: {m!r}" for v, m in zip(listed.loc[clash, "version"], listed.loc[clash, "merged"], strict=True)],
    )
    shown = listed[clash & first]
    rejections.append(_rejected(K722, shown, LABEL_CONFLICT, ["labels differ: " + told[c] for c in shown["clip_id"]]))
    section["conflicts"] = len(shown)
    for v in fates:
        report_versions[v].setdefault("k722_conflicts", {})[split] = int((clash & (listed["version"] == v)).sum())
    keep = ~clash

    if split == "train":
        leaked_in = {v: listed["youtube_id"].isin(videos) & keep for v, videos in held_out_videos.items()}
        leak = np.logical_or.reduce([m.to_numpy() for m in leaked_in.values()])
        shown = listed[leak & first]
        versions_of = [", ".join(v for v in leaked_in if leaked_in[v][i]) for i in shown.index]
        rejections.append(
            _rejected(K722, shown, LEAKAGE, ["video in the validate/test split of " + w for w in versions_of])
        )
        section["leakage_removed"] = len(shown)
        section["leakage_by_version"] = {v: int((m & first).sum()) for v, m in leaked_in.items()}
        for v in fates:
            report_versions[v]["k722_leakage_removed"] = int((leak & (listed["version"] == v)).sum())
        keep &= ~leak

    # The first version (in the order given) whose copy of the clip was kept gives the file; a clip without any
    # kept copy is rejected with its first copy's reason, every copy's in the detail.
    listed = listed[keep]
    chosen = listed[listed["reason"] == ""].drop_duplicates("clip_id")
    lost = listed[~listed["clip_id"].isin(set(chosen["clip_id"]))]
    why = _joined(
        lost["clip_id"],
        [f"{v}: {r} ({d})" for v, r, d in zip(lost["version"], lost["reason"], lost["detail"], strict=True)],
    )
    shown = lost.drop_duplicates("clip_id")
    rejections.append(_rejected(K722, shown, shown["reason"], ["no usable copy: " + why[c] for c in shown["clip_id"]]))
    section["rejected"] = len(shown)
    section["kept"] = len(chosen)
    return chosen, rejections, section


def build_k722(
    versions: Sequence[VersionSource],
    probe: Probe,
    *,
    aliases: Mapping[str, str] = KINETICS_ALIASES,
    min_frames: int = 1,
    workers: int = 8,
    progress: bool = False,
    relative_to: str | os.PathLike[str] | None = None,
) -> K722Build:
    """The Kinetics versions -> manifest, rejections, class mapping and report (nothing written; see
    :func:`write_k722`). Every CSV is read and checked, and every clip root listed, before any clip is probed.

    Per version (its clips, its own class names and labels):

    1. rows repeated in its CSVs count once (``duplicates``); a clip listed in two splits or with two labels is
       dropped (``conflicts``, one per row: reason ``split_conflict`` / ``label_conflict``);
    2. a train clip whose video (``youtube_id``) is in the version's validate or test split is dropped
       (``leakage_removed``, reason ``leakage``);
    3. the clip's file is found (:class:`ClipLocator`; else ``missing_files``, reason ``missing_file``), and each
       distinct file probed once (``unreadable``: count per probe reason; ``too_short`` below ``min_frames``); the
       rest is ``kept``. So ``clips_listed == duplicates + conflicts + leakage_removed + missing_files +
       sum(unreadable.values()) + kept`` and ``found == sum(unreadable.values()) + kept``.

    K722 (merged class names and labels), per split (train, validate):

    - the distinct clips of that split in all versions (``candidates``: one ``clip_id`` is one clip, whichever
      versions list it); a clip the versions give different merged labels is dropped (``conflicts``, reason
      ``label_conflict``, every version's label in the detail; per version ``k722_conflicts``);
    - train only: a clip whose video is in any version's validate or test split is dropped (``leakage_removed``;
      ``leakage_by_version``: how many of them each version's held-out splits hold; reason ``leakage``);
    - the file is that of the first version (in the order given) whose copy was kept (column ``source``); a clip
      with no kept copy is ``rejected`` with its first copy's reason. ``candidates == conflicts +
      leakage_removed + rejected + kept``.

    Manifest columns (:data:`MANIFEST_COLUMNS`): dataset, split, clip_id, youtube_id, time_start, time_end, label
    (int64 index into the dataset's classes of ``mapping``; -1 when unlabelled), label_name (None when
    unlabelled), source (whose file), path (posix; relative to ``relative_to`` when under it), num_frames, fps,
    width, height. Rows and rejections are ordered by dataset (k722, then the versions as given), split and
    clip_id, so the result does not depend on ``workers`` or on the CSVs' row order.
    """
    if min_frames < 1:
        raise ValueError(f"min_frames must be >= 1, got {min_frames}")
    names = [v.name for v in versions]
    if not names or len(set(names)) != len(names) or K722 in names or not all(names):
        raise ValueError(f"Kinetics versions need distinct, non-empty names other than {K722!r}; got {names}")
    prefix = None if relative_to is None else os.path.join(os.path.abspath(relative_to), "")

    # Every CSV read and checked, the classes and the mapping fixed, the files found: errors before probing.
    tables = {v.name: _read_version(v) for v in versions}
    version_classes: dict[str, list[str]] = {}
    for v in versions:
        labels = set(tables[v.name]["label"]) - {""}
        if v.classes is not None:
            outside = sorted(labels - {str(c) for c in v.classes})
            if outside:
                raise ValueError(
                    f"Kinetics version {v.name!r}: {len(outside)} CSV label(s) not in its class list, e.g. "
                    f"{outside[:_EXAMPLES]} (check the class list given)"
                )
            labels = {str(c) for c in v.classes}
        version_classes[v.name] = sorted(labels)
    mapping = k722_class_mapping(version_classes, aliases)
    fates: dict[str, pd.DataFrame] = {}
    rejections: list[pd.DataFrame] = []
    report_versions: dict[str, dict[str, Any]] = {}
    for v in versions:
        fates[v.name], conflicts, report_versions[v.name] = _version_fates(v, tables[v.name], prefix)
        report_versions[v.name]["classes"] = len(version_classes[v.name])
        rejections.append(conflicts)

    # Each distinct file probed once, in a fixed order (versions as given, then rows).
    files = list(dict.fromkeys(f for rows in fates.values() for f in rows.loc[rows["reason"] == "", "file"]))
    probed = dict(zip(files, probe_clips(files, probe, min_frames, workers, progress), strict=True))

    datasets: list[pd.DataFrame] = []
    for v in versions:
        rows = fates[v.name]
        live = rows["reason"] == ""
        results = pd.DataFrame([probed[f] for f in rows.loc[live, "file"]], columns=list(ProbeResult._fields))
        results.index = rows.index[live]
        for column in ("num_frames", "fps", "width", "height"):
            rows[column] = results[column]  # aligned on the index: NaN where not probed
        rows.loc[live, "reason"] = results["reason"]
        rows.loc[live, "detail"] = results["detail"]
        bad = rows["reason"] != ""
        rejections.append(_rejected(v.name, rows[bad], rows.loc[bad, "reason"], rows.loc[bad, "detail"]))
        good = rows[~bad]
        own = {name: i for i, name in enumerate(mapping["versions"][v.name]["classes"])}
        datasets.append(
            good.assign(
                dataset=v.name,
                label=good["label"].map(own).fillna(-1).astype(np.int64),
                label_name=good["label"].where(good["label"] != "", None).astype(object),
                source=v.name,
            )
        )
        unreadable = rows.loc[live & bad, "reason"].value_counts()
        report_versions[v.name].update(
            unreadable={str(r): int(unreadable[r]) for r in sorted(unreadable.index)},
            kept=len(good),
            kept_by_split={s: int((good["split"] == s).sum()) for s in SPLITS},
        )

    # Held out is what the CSVs list as validate/test, whether its files are there or not.
    held_out_videos = {
        name: set(rows.loc[rows["split"].isin(HELD_OUT_SPLITS), "youtube_id"]) for name, rows in tables.items()
    }
    k722_index = {name: i for i, name in enumerate(mapping["k722_classes"])}
    k722_report: dict[str, Any] = {"classes": len(mapping["k722_classes"])}
    for split in ("train", "validate"):
        chosen, rejected, k722_report[split] = _merge_split(split, fates, aliases, held_out_videos, report_versions)
        rejections.extend(rejected)
        datasets.append(
            chosen.assign(
                dataset=K722,
                label=chosen["merged"].map(k722_index).astype(np.int64),
                label_name=chosen["merged"].astype(object),
                source=chosen["version"],
            )
        )

    manifest = _ordered(pd.concat([d[list(MANIFEST_COLUMNS)] for d in datasets], ignore_index=True), names)
    manifest = manifest.astype(
        dict.fromkeys(("time_start", "time_end", "label", "num_frames", "width", "height"), np.int64) | {"fps": float}
    )
    rejected_all = _ordered(pd.concat(rejections, ignore_index=True), names)
    report = {"versions": report_versions, K722: k722_report, "min_frames": min_frames}
    return K722Build(manifest, rejected_all, mapping, report)


def write_k722(build: K722Build, directory: str | os.PathLike[str]) -> dict[str, Path]:
    """The build's four files in ``directory``, each replaced atomically: ``kinetics_manifest.parquet``,
    ``kinetics_rejections.parquet``, ``k722_class_mapping.json`` (next to the manifest, what the video fine-tune
    indexes the K722 head with) and ``kinetics_report.json``. -> name -> path."""
    directory = Path(directory)
    out = {
        "manifest": directory / "kinetics_manifest.parquet",
        "rejections": directory / "kinetics_rejections.parquet",
        "mapping": directory / "k722_class_mapping.json",
        "report": directory / "kinetics_report.json",
    }
    replace_atomically(out["manifest"], lambda tmp: build.manifest.to_parquet(tmp, index=False))
    replace_atomically(out["rejections"], lambda tmp: build.rejections.to_parquet(tmp, index=False))
    write_class_mapping(out["mapping"], build.mapping)
    replace_atomically(
        out["report"],
        lambda tmp: tmp.write_text(json.dumps(build.report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"),
    )
    return out
