"""OpenClipTeacher: target = ln_post(last-layer patch tokens) @ proj, cls dropped, frozen, grid-aligned, offline-safe.

Uses tiny random open_clip configs registered from tmp files: no download, each build takes milliseconds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eva_pipeline.teachers import OpenClipTeacher, Teacher, TeacherWeightsUnavailable, create_teacher
from eva_pipeline.teachers.open_clip_teacher import resolve_weights

TINY = "eva-test-tiny-vit"  # 28 px, patch 4 -> 7x7 grid, 2 layers
TINY_NO_LAYERS = "eva-test-tiny-vit-l0"  # 0 layers: every token depends on its own patch only
PATCH = 4
IMAGE = 28
GRID = (IMAGE // PATCH, IMAGE // PATCH)
EMBED_DIM = 24
BATCH = 2
FAST_FAIL_S = 10.0
CHECKPOINT_SUFFIX = {"state_dict": "pt", "safetensors": "safetensors", "torchscript": "pt"}
ATOL = 1e-5


def _config(layers: int) -> dict:
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {"image_size": IMAGE, "layers": layers, "width": 32, "head_width": 16, "patch_size": PATCH},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }


@pytest.fixture(scope="module", autouse=True)
def tiny_configs(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, layers in ((TINY, 2), (TINY_NO_LAYERS, 0)):
        (folder / f"{name}.json").write_text(json.dumps(_config(layers)))
    open_clip.add_model_config(folder)


def _images(size: tuple[int, int] = (IMAGE, IMAGE), seed: int = 0) -> Tensor:
    return torch.randn(BATCH, 3, *size, generator=torch.Generator().manual_seed(seed))


def manual_targets(visual: nn.Module, images: Tensor) -> Tensor:
    """Independent reference: patchify, add cls + pos, ln_pre, blocks, drop cls, ln_post, @ proj."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks:
        x = block(x)
    return visual.ln_post(x[:, 1:]) @ visual.proj


def test_targets_equal_ln_post_proj_of_patch_tokens() -> None:
    teacher = OpenClipTeacher(TINY, pretrained=None)
    images = _images()
    out = teacher.targets(images, GRID)
    assert isinstance(teacher, Teacher) and teacher.target_dim == EMBED_DIM
    assert out.shape == (BATCH, GRID[0] * GRID[1], EMBED_DIM) and out.dtype == torch.float32
    with torch.no_grad():
        ref = manual_targets(teacher.visual, images)
        # the projected cls token (what open_clip's pooled output is) must not be among the targets
        pooled = teacher.visual(images)[0]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert torch.cdist(pooled[:, None], out).min() > 1e-3


def test_student_images_are_resized_bicubic_to_the_teacher_input() -> None:
    teacher = OpenClipTeacher(TINY, pretrained=None)
    images = _images(size=(2 * IMAGE, 2 * IMAGE))
    with torch.no_grad():
        ref = manual_targets(teacher.visual, F.interpolate(images, size=(IMAGE, IMAGE), mode="bicubic", antialias=True))
    torch.testing.assert_close(teacher.targets(images, GRID), ref, atol=ATOL, rtol=0)


def test_teacher_is_frozen_and_targets_feed_a_loss() -> None:
    teacher = OpenClipTeacher(TINY, pretrained=None)
    images = _images().requires_grad_(True)
    parent = nn.ModuleDict({"teacher": teacher, "student": nn.Linear(EMBED_DIM, EMBED_DIM)})
    parent.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    out = teacher.targets(images, GRID)
    assert not out.requires_grad and out.grad_fn is None
    pred = parent["student"](torch.randn_like(out))
    loss = -F.cosine_similarity(pred, out, dim=-1).mean()
    loss.backward()  # would fail if targets were inference-mode tensors
    assert images.grad is None
    assert all(p.grad is None for p in teacher.parameters())


def test_token_i_belongs_to_patch_i_row_major_on_a_non_square_grid() -> None:
    grid = (7, 5)
    teacher = OpenClipTeacher(TINY_NO_LAYERS, pretrained=None, image_size=(grid[0] * PATCH, grid[1] * PATCH))
    images = _images(size=(grid[0] * PATCH, grid[1] * PATCH))
    base = teacher.targets(images, grid)
    for r, c in ((0, 0), (2, 3), (6, 4), (6, 0)):
        bumped = images.clone()
        bumped[:, :, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] += 1.0
        changed = (teacher.targets(bumped, grid) - base).abs().amax(dim=(0, 2)) > 1e-4
        assert changed.nonzero().flatten().tolist() == [r * grid[1] + c]


def test_grid_mismatch_raises_and_names_the_image_size_to_use() -> None:
    teacher = OpenClipTeacher(TINY, pretrained=None)
    with pytest.raises(ValueError, match=r"image_size=\(32, 24\)"):
        teacher.targets(_images(), (8, 6))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:.*TorchScript archive:UserWarning")
@pytest.mark.parametrize("fmt", ["state_dict", "safetensors", "torchscript"])
def test_local_checkpoint_file_is_loaded(tmp_path: Path, fmt: str) -> None:
    model = open_clip.create_model(TINY, pretrained=None).eval()
    state = model.state_dict()
    path = tmp_path / f"tiny.{CHECKPOINT_SUFFIX[fmt]}"
    if fmt == "state_dict":
        torch.save(state, path)
    elif fmt == "safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:  # like OpenAI's original ViT-L-14.pt: a TorchScript archive whose state_dict is the checkpoint
        torch.jit.save(torch.jit.script(_module_tree(state)), str(path))
    teacher = OpenClipTeacher(TINY, pretrained=str(path))
    for key, value in model.visual.state_dict().items():
        assert torch.equal(teacher.visual.state_dict()[key], value), key
    images = _images(seed=3)
    with torch.no_grad():
        ref = manual_targets(model.visual, images)
    torch.testing.assert_close(teacher.targets(images, GRID), ref, atol=ATOL, rtol=0)


def _module_tree(state: dict[str, Tensor]) -> nn.Module:
    """A scriptable module whose state_dict equals ``state`` (plus OpenAI's scalar extras)."""
    root = nn.Module()
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_buffer(leaf, value.clone())
    root.register_buffer("input_resolution", torch.tensor(IMAGE))
    return root


def test_other_grid_interpolates_the_checkpoint_pos_embed_bicubically(tmp_path: Path) -> None:
    model = open_clip.create_model(TINY, pretrained=None)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    grid = (9, 6)
    teacher = OpenClipTeacher(TINY, pretrained=str(tmp_path / "tiny.pt"), image_size=(grid[0] * PATCH, grid[1] * PATCH))
    old = model.visual.positional_embedding.detach()
    old_img = old[1:].reshape(1, *GRID, -1).permute(0, 3, 1, 2)
    new_img = F.interpolate(old_img, size=grid, mode="bicubic", align_corners=False, antialias=True).permute(0, 2, 3, 1)
    expected = torch.cat([old[:1], new_img.reshape(grid[0] * grid[1], -1)])
    torch.testing.assert_close(teacher.visual.positional_embedding, expected)
    assert teacher.targets(_images(size=(IMAGE, IMAGE)), grid).shape == (BATCH, grid[0] * grid[1], EMBED_DIM)


def _assert_offline_instructions(message: str) -> None:
    for needle in (
        "pretrained: /path/to/",
        "HF_HOME",
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
        "timm/vit_large_patch14_clip_224.openai",
        "create_model('ViT-L-14', pretrained='openai')",
        "quick_gelu: true",
    ):
        assert needle in message, needle


def test_missing_openai_weights_fail_fast_with_instructions(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(TeacherWeightsUnavailable) as err:
        OpenClipTeacher("ViT-L-14", pretrained="openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < FAST_FAIL_S
    _assert_offline_instructions(str(err.value))


def test_missing_local_file_fails_fast_via_factory(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(TeacherWeightsUnavailable, match="neither an existing file") as err:
        create_teacher("open_clip", model_name="ViT-L-14", pretrained=str(tmp_path / "absent.bin"))
    assert time.perf_counter() - start < FAST_FAIL_S
    _assert_offline_instructions(str(err.value))


def test_cached_openai_weights_are_found_in_the_hf_cache_with_quick_gelu(tmp_path: Path) -> None:
    """The lookup open_clip would do, without network and without building ViT-L-14."""
    snapshot = tmp_path / "models--timm--vit_large_patch14_clip_224.openai" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"stub")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    resolved = resolve_weights("ViT-L-14", "openai", cache_dir=str(tmp_path))
    assert Path(resolved.path or "") == snapshot / "open_clip_pytorch_model.bin"
    assert resolved.quick_gelu is True
    assert resolve_weights("ViT-L-14", "openai", quick_gelu=False, cache_dir=str(tmp_path)).quick_gelu is False


def test_unknown_model_name_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="Unknown open_clip model"):
        OpenClipTeacher("no-such-model", pretrained="openai")


def test_target_dim_without_weights_matches_the_built_teacher(monkeypatch) -> None:
    from eva_pipeline.teachers import factory, teacher_target_dim

    assert (
        teacher_target_dim("open_clip", model_name=TINY, pretrained=None)
        == OpenClipTeacher(TINY, pretrained=None).target_dim
    )
    monkeypatch.setattr(factory, "create_teacher", lambda *a, **k: pytest.fail("built a teacher"))
    # The paper's teacher: 768-d targets known from the config alone (no weights file is looked for).
    assert teacher_target_dim("open_clip", model_name="ViT-L-14", pretrained="openai") == 768
