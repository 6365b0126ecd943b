"""The ``image_folder`` source kind: a directory tree of image files, with class folders or flat.

Class folders (ImageNet-21K): label = index of the immediate subdirectory in sorted order. Flat (COCO, Objects365,
ADE20K image folders): every image in the tree, unlabelled. ``layout="auto"`` decides from the tree
(:func:`detect_folder_layout`). Files whose names are not image names are ignored and counted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from eva_pipeline.ingest.decode import is_image_name
from eva_pipeline.ingest.readers.common import UnitRunner, file_unit, no_labels_file, posix
from eva_pipeline.ingest.scan import SourceScan, SourceSpec, register_source_kind
from eva_pipeline.ingest.scan_cache import UnitCache

OUTSIDE_CLASSES = "outside class folders"

#: How many ignored (non-image) file names an image_folder report lists.
_IGNORED_EXAMPLES = 20


def _sorted_entries(path: str) -> list[os.DirEntry[str]]:
    """Visible entries of one directory, sorted by name (hidden ``.*`` entries are skipped)."""
    with os.scandir(path) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _walk_files(path: str) -> Iterator[os.DirEntry[str]]:
    """Every file under ``path``, depth first in sorted order; one directory listing held per level."""
    for entry in _sorted_entries(path):
        if entry.is_dir():
            yield from _walk_files(entry.path)
        else:
            yield entry


def _has_image_file(path: str) -> bool:
    with os.scandir(path) as it:
        return any(e.is_file() and is_image_name(e.name) for e in it)


def detect_folder_layout(root: str | os.PathLike[str]) -> str:
    """``"class_folders"`` when no image lies directly in ``root`` and an immediate subdirectory holds images
    (ImageNet-21K), else ``"flat"`` (COCO, Objects365, ADE20K image folders).

    Pass the folder that really holds the images (e.g. ``train2017/``): a parent of several split folders would
    look like class folders; ``layout="flat"`` overrides the guess.
    """
    root = os.fspath(root)
    if _has_image_file(root):
        return "flat"
    subdirs = [e.path for e in _sorted_entries(root) if e.is_dir()]
    return "class_folders" if any(_has_image_file(d) for d in subdirs) else "flat"


@register_source_kind("image_folder")
def read_image_folder(spec: SourceSpec, units: UnitCache | None = None) -> SourceScan:
    """A directory tree of image files. Class folders: label = index of the immediate subdirectory in sorted
    order (every visible subdirectory is a class, as torchvision's ImageFolder), names in ``info["classes"]``;
    an image directly under the root is then rejected. Flat: every image in the tree, unlabelled."""
    no_labels_file(spec)
    root = posix(os.fspath(spec.images))
    if not os.path.isdir(root):
        raise ValueError(f"{root} is not a directory")
    layout = detect_folder_layout(root) if spec.layout == "auto" else spec.layout
    scan = SourceScan(available=0)
    classes: dict[str, int] = {}
    if layout == "class_folders":
        classes = {name: i for i, name in enumerate(e.name for e in _sorted_entries(root) if e.is_dir())}
    limit = spec.limit
    candidates = 0
    ignored: list[str] = []
    n_ignored = 0
    prefix = len(root.rstrip("/")) + 1
    with UnitRunner(scan, units, spec.decode_workers) as runner:
        for entry in _walk_files(root):
            location = posix(entry.path)
            if not is_image_name(entry.name):
                n_ignored += 1
                if len(ignored) < _IGNORED_EXAMPLES:
                    ignored.append(location)
                continue
            candidates += 1
            if limit is not None and candidates > limit:
                continue  # counted in `available`, not read
            label = None
            if layout == "class_folders":
                top, sep, _ = location[prefix:].partition("/")
                if not sep:
                    runner.direct(
                        lambda scan, location=location: scan.reject(
                            location, OUTSIDE_CLASSES, "an image directly under the root of a class-folder tree"
                        )
                    )
                    continue
                label = classes[top]
            file_unit(runner, location, label)
    scan.available = candidates
    scan.info.update({"layout": layout, "ignored_files": n_ignored, "ignored_examples": ignored})
    if layout == "class_folders":
        scan.info["classes"] = list(classes)
    return scan
