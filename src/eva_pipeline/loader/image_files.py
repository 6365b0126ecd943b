"""Image files given on a command line -> an ordered list of paths -> a streaming dataset of model inputs.

A source is an image file, a folder (searched recursively for image names, sorted) or a text list of image paths
in ingestion's ``file_list`` format (one path per line, an optional label ignored, relative paths against the
list's folder, blank and ``#`` lines skipped). Images are read and decoded one by one in the loader's workers, as
ingestion decodes them (:func:`~eva_pipeline.ingest.decode.decode_image`: EXIF rotation, RGB), so memory does not
grow with the number of images; an unreadable one is reported by path, with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from eva_pipeline.ingest.decode import IMAGE_EXTENSIONS, decode_image, is_image_name
from eva_pipeline.ingest.readers.file_list import parse_list_line

#: Inference takes any decodable image: the training minimum side does not apply.
MIN_SIDE = 1


class ImageListError(ValueError):
    """A source that gives no images, or a list naming a file that is not there (the message says which)."""


def _list_file(path: Path) -> list[Path]:
    out = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                name, _label = parse_list_line(line)
            except ValueError as err:
                raise ImageListError(f"{path}:{lineno}: {err}") from None
            image = Path(name) if os.path.isabs(name) else path.parent / name
            if not image.is_file():
                raise ImageListError(f"{path}:{lineno}: no image file at {image}")
            out.append(image)
    if not out:
        raise ImageListError(f"{path}: the list names no images")
    return out


def list_images(sources: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The images of ``sources``, in order: a file with an image extension as is, a folder's images recursively
    (sorted by path), any other file as a list of paths."""
    images: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.rglob("*") if p.is_file() and is_image_name(p.name))
            if not found:
                raise ImageListError(
                    f"no images in folder {source} (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            images += found
        elif source.is_file():
            images += [source] if is_image_name(source.name) else _list_file(source)
        else:
            raise ImageListError(f"no file or folder at {source}")
    return images


class ImageFiles(Dataset):
    """``paths[i]`` decoded and transformed: ``(i, tensor, None)``, or ``(i, None, reason)`` when it cannot be read.

    ``transform`` takes an RGB PIL image (e.g. ``finetune.augment.eval_transform(size)``).
    """

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        path = self.paths[index]
        try:
            data = path.read_bytes()
        except OSError as err:
            return index, None, f"unreadable file: {err.strerror or err}"
        image, rejection = decode_image(data, str(path), min_side=MIN_SIDE)
        if rejection is not None:
            # the caller names the path once; inside the reason the file name is enough
            detail = rejection.detail.removeprefix(f"{path}: ").replace(str(path), path.name)
            return index, None, f"{rejection.reason} ({detail})"
        return index, self.transform(image), None


def collate_images(
    items: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """A batch of :class:`ImageFiles` items -> (indices of the decoded ones, their stacked tensors or None when none
    decoded, (index, reason) of the others)."""
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    stacked = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], stacked, bad


def image_loader(dataset: ImageFiles, batch_size: int, num_workers: int = 0) -> Any:
    """Batches of :func:`collate_images` in the order of the paths, decoded by ``num_workers`` processes."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_images)
