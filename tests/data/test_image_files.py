"""Images named on a command line: files, recursive folders and path lists resolve in a stable order, and every
problem names the file (and line) it is about; unreadable images come back as reasons, not exceptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eva_pipeline.loader.image_files import ImageFiles, ImageListError, collate_images, image_loader, list_images


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("a.png", "b/c.JPG", "b/d.png"):
        Image.fromarray(np.full((20, 24, 3), 7, np.uint8)).save(tmp_path / name, format="PNG")
    (tmp_path / "notes.md").write_text("not an image")
    return tmp_path


def test_files_folders_and_lists_resolve_in_order(tree):
    assert list_images([tree]) == [tree / "a.png", tree / "b/c.JPG", tree / "b/d.png"]
    listing = tree / "list.txt"
    listing.write_text(f"# comment\n\nb/d.png 3\n{tree / 'a.png'}\n")
    assert list_images([listing, tree / "b/c.JPG"]) == [tree / "b/d.png", tree / "a.png", tree / "b/c.JPG"]


def test_list_problems_name_the_file_and_line(tree):
    listing = tree / "list.txt"
    listing.write_text("a.png\nmissing.png\n")
    with pytest.raises(ImageListError, match=r"list.txt:2: no image file at .*missing.png"):
        list_images([listing])
    listing.write_text("a.png\tcat\n")
    with pytest.raises(ImageListError, match=r"list.txt:1: label 'cat' is not an integer"):
        list_images([listing])
    listing.write_text("# nothing\n")
    with pytest.raises(ImageListError, match="names no images"):
        list_images([listing])
    (tree / "empty").mkdir()
    with pytest.raises(ImageListError, match="no images in folder"):
        list_images([tree / "empty"])
    with pytest.raises(ImageListError, match="no file or folder at"):
        list_images([tree / "nope"])


def test_unreadable_images_are_reasons_in_the_batch(tree):
    (tree / "broken.png").write_bytes(b"\x89PNG broken")
    paths = [tree / "a.png", tree / "broken.png", tree / "b/d.png"]
    dataset = ImageFiles(paths, lambda image: torch.from_numpy(np.array(image)).permute(2, 0, 1))
    ((indices, images, bad),) = list(image_loader(dataset, batch_size=3))
    assert indices == [0, 2] and images.shape == (2, 3, 20, 24)
    assert [i for i, _ in bad] == [1] and bad[0][1].startswith("not an image")
    assert str(tree) not in bad[0][1]  # the path is reported once, by the caller
    assert collate_images([(0, None, "x")]) == ([], None, [(0, "x")])
