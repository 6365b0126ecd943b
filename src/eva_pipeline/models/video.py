"""Space-time EVA for video classification (EVA paper, Kinetics video action recognition; official code EVA-01/video
``models/beit.py`` ``PatchEmbed3D``/``VisionTransformer`` and ``models/clip_mae.py`` ``build_model``).

No new architecture: the image classifier with a Conv3d patch embedding of kernel (t, p, p) and a pos_embed for
T' = T / t frames of N patches, tokens time-major, one joint attention over cls + T' x N tokens, head on the mean of
the patch tokens. Its start weights come from the image model: :func:`inflate_image_state` repeats the 2-D kernel over
the tubelet (divided by t) and the spatial pos_embed over the frames; a video checkpoint of another frame count gets
its pos_embed resized trilinearly (:func:`resample_temporal_pos_embed`), as the official loader does.

Clips are (B, C, T, H, W), Conv3d's own layout (the official model takes (B, T, C, H, W) and transposes inside).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from eva_pipeline.models.checkpoint import (
    HEAD_KEYS,
    CheckpointError,
    LoadReport,
    block_count,
    check_start_keys,
    extract_state_dict,
    listed,
    load_official_checkpoint,
    resample_image_pos_embed,
)
from eva_pipeline.models.config import EvaConfig
from eva_pipeline.models.eva import HEAD_INIT_SCALE, EvaClassifier

#: Top-level key of a video classifier checkpoint holding its ``num_frames`` and ``tubelet``.
VIDEO_KEY = "video"
VIDEO_FIELDS: tuple[str, str] = ("num_frames", "tubelet")
# EVA-01 video: tubelet 1 (configs/kinetics*_ft.yaml, TUBELET_SIZE: 1).
DEFAULT_TUBELET = 1


def check_video_fields(num_frames: int, tubelet: int) -> None:
    """Raise ``ValueError`` unless both are positive ints and ``tubelet`` divides ``num_frames``."""
    for name, value in (("num_frames", num_frames), ("tubelet", tubelet)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_frames % tubelet:
        raise ValueError(f"num_frames {num_frames} is not divisible by tubelet {tubelet}: use a multiple of {tubelet}")


class VideoPatchEmbed(nn.Module):
    """Tubelet embedding (official ``PatchEmbed3D``): Conv3d of kernel = stride = (t, p, p); (B, C, T, H, W) ->
    (B, T' * N, D), time-major (frame 0's N patches row by row, then frame 1's, ...).

    The module path ``patch_embed.proj`` keeps the official key ``patch_embed.proj.weight`` (shape (D, C, t, p, p)).
    """

    def __init__(
        self, img_size: int, patch_size: int, num_frames: int, tubelet: int, in_chans: int, embed_dim: int
    ) -> None:
        super().__init__()
        check_video_fields(num_frames, tubelet)
        self.num_frames = num_frames
        self.tubelet = tubelet
        self.temporal_size = num_frames // tubelet
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches_per_frame = self.grid_size[0] * self.grid_size[1]
        self.num_patches = self.temporal_size * self.num_patches_per_frame
        kernel = (tubelet, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.proj(clips).flatten(2).transpose(1, 2)


class EvaVideoClassifier(EvaClassifier):
    """The EVA classifier over clips of ``num_frames`` frames: Conv3d tubelet embedding, pos_embed (1, 1 + T' * N, D).

    Everything else is :class:`EvaClassifier` unchanged (blocks, mean pooling -> fc_norm -> head, init, drop path,
    gradient checkpointing, layer-decay groups: embeddings 0, ``blocks.i`` i + 1, the rest depth + 1). The patch
    embedding is trained by default (``freeze_patch_embed=False``): EVA's video fine-tunes set STOP_GRAD_CONV1 False,
    unlike its image fine-tunes.
    """

    def __init__(
        self,
        config: EvaConfig,
        num_classes: int,
        *,
        num_frames: int,
        tubelet: int = DEFAULT_TUBELET,
        freeze_patch_embed: bool = False,
        head_init_scale: float = HEAD_INIT_SCALE,
        initialise: bool = True,
    ) -> None:
        check_video_fields(num_frames, tubelet)
        super().__init__(
            config, num_classes, freeze_patch_embed=False, head_init_scale=head_init_scale, initialise=False
        )
        self.num_frames = num_frames
        self.tubelet = tubelet
        # Replacing the registered modules keeps their place, so state_dict keys stay in the image model's order.
        self.patch_embed = VideoPatchEmbed(
            config.img_size, config.patch_size, num_frames, tubelet, config.in_chans, config.embed_dim
        )
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, config.embed_dim))
        self.detach_patch_embed = freeze_patch_embed
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)
        if initialise:
            self.init_weights()

    @property
    def temporal_size(self) -> int:
        """T' = num_frames / tubelet, the positions along time."""
        return self.patch_embed.temporal_size

    @property
    def num_patches_per_frame(self) -> int:
        """N, the spatial patches of one frame (one tubelet slice)."""
        return self.patch_embed.num_patches_per_frame

    @property
    def video(self) -> dict[str, int]:
        """What a checkpoint stores besides the image config to rebuild this model."""
        return {"num_frames": self.num_frames, "tubelet": self.tubelet}

    def _check_images(self, clips: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_chans, self.num_frames, cfg.img_size, cfg.img_size)
        if clips.ndim == 5 and tuple(clips.shape[1:]) == expected:
            return
        hint = ""
        if clips.ndim == 5 and tuple(clips.shape[1:]) == (self.num_frames, cfg.in_chans, cfg.img_size, cfg.img_size):
            hint = "; that is (batch, frames, channels, ...): pass clips.transpose(1, 2)"
        want = ", ".join(map(str, expected))
        raise ValueError(
            f"expected clips of shape (batch, channels, frames, height, width) = (batch, {want}), "
            f"got {tuple(clips.shape)}{hint}"
        )

    def forward_features(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) clips -> block output for all tokens, (B, 1 + T' * N, D), cls first, time-major."""
        return super().forward_features(clips)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) clips -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(clips))


# ---- start weights ------------------------------------------------------------------------------------------------
def inflate_patch_embed_weight(weight: torch.Tensor, tubelet: int) -> torch.Tensor:
    """(D, C, p, p) -> (D, C, t, p, p): the 2-D kernel repeated over the tubelet and divided by t (official
    ``build_model``), so a tubelet's embedding is the mean of its frames' 2-D embeddings (the bias is unchanged)."""
    return weight.unsqueeze(2).repeat(1, 1, tubelet, 1, 1) / tubelet


def _square_side(tokens: int, what: str) -> int:
    side = math.isqrt(max(tokens, 0))
    if tokens <= 0 or side * side != tokens:
        raise CheckpointError(f"{what} has {tokens} patch positions, not a square grid")
    return side


def _check_pos_embed(pos_embed: torch.Tensor) -> None:
    if pos_embed.ndim != 3 or pos_embed.shape[1] < 2:
        raise CheckpointError(f"pos_embed must be (1, 1 + tokens, dim), got {tuple(pos_embed.shape)}")


def inflate_image_state(
    state: Mapping[str, torch.Tensor],
    num_frames: int,
    tubelet: int = DEFAULT_TUBELET,
    grid: int | tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """An image state dict (MIM or classifier, official keys) -> the video model's: the Conv2d kernel inflated
    (:func:`inflate_patch_embed_weight`), pos_embed = cat(cls, spatial repeated T' times), every other key as is.

    ``grid`` is the video model's patch grid per frame; when it differs from the image's, the spatial pos_embed is
    first resized bicubically as an image fine-tune does (the official video code only ever starts at 224).
    """
    check_video_fields(num_frames, tubelet)
    missing = [k for k in ("patch_embed.proj.weight", "pos_embed") if k not in state]
    if missing:
        raise CheckpointError(f"not an EVA state dict: no {missing} (keys: {listed(sorted(state))})")
    weight, pos = state["patch_embed.proj.weight"], state["pos_embed"]
    if weight.ndim != 4:
        raise CheckpointError(
            f"patch_embed.proj.weight has shape {tuple(weight.shape)}, not an image (Conv2d) kernel (D, C, p, p): "
            "a video checkpoint needs no inflation (load it with load_video_start)"
        )
    _check_pos_embed(pos)
    side = _square_side(pos.shape[1] - 1, "the image pos_embed")
    if grid is not None:
        grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if grid != (side, side):
            pos = resample_image_pos_embed(pos.float(), grid).to(pos.dtype)
    frames = num_frames // tubelet
    out = dict(state)
    out["patch_embed.proj.weight"] = inflate_patch_embed_weight(weight, tubelet)
    out["pos_embed"] = torch.cat((pos[:, :1], pos[:, 1:].repeat(1, frames, 1)), dim=1)
    return out


def resample_video_pos_embed(pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """(1, 1 + T * H * W, D) -> (1, 1 + T2 * H2 * W2, D): the time-major patch positions resized trilinearly on their
    (T, H, W) grid (``align_corners=False``, in fp32), cls kept, as the official ``build_model`` does for a new frame
    count or image size. Identity (the same tensor) when the grids are equal."""
    old_grid, new_grid = tuple(int(x) for x in old_grid), tuple(int(x) for x in new_grid)
    if len(old_grid) != 3 or len(new_grid) != 3:
        raise ValueError(f"grids must be (frames, height, width), got {old_grid} and {new_grid}")
    _check_pos_embed(pos_embed)
    if pos_embed.shape[1] != 1 + math.prod(old_grid):
        raise CheckpointError(
            f"pos_embed has {pos_embed.shape[1] - 1} patch positions, not a {'x'.join(map(str, old_grid))} grid"
        )
    if old_grid == new_grid:
        return pos_embed
    batch, dim = pos_embed.shape[0], pos_embed.shape[2]
    tokens = pos_embed[:, 1:].float().reshape(batch, *old_grid, dim).permute(0, 4, 1, 2, 3)
    tokens = F.interpolate(tokens, size=new_grid, mode="trilinear", align_corners=False)
    tokens = tokens.permute(0, 2, 3, 4, 1).reshape(batch, -1, dim).to(pos_embed.dtype)
    return torch.cat((pos_embed[:, :1], tokens), dim=1)


def resample_temporal_pos_embed(pos_embed: torch.Tensor, num_patches_per_frame: int, new_frames: int) -> torch.Tensor:
    """A video pos_embed resized over time only to ``new_frames`` temporal positions (T' = frames / tubelet; 8 -> 16
    for the K722 -> K400 stage): the official trilinear resize with the spatial size unchanged, i.e. linear
    interpolation along time (``align_corners=False``). Identity when the count is already ``new_frames``."""
    _check_pos_embed(pos_embed)
    tokens = pos_embed.shape[1] - 1
    if num_patches_per_frame <= 0 or tokens % num_patches_per_frame:
        raise CheckpointError(
            f"pos_embed has {tokens} patch positions, not a whole number of frames of {num_patches_per_frame}"
        )
    if isinstance(new_frames, bool) or not isinstance(new_frames, int) or new_frames <= 0:
        raise ValueError(f"new_frames must be a positive int, got {new_frames!r}")
    old = (tokens // num_patches_per_frame, num_patches_per_frame, 1)
    return resample_video_pos_embed(pos_embed, old, (new_frames, num_patches_per_frame, 1))


@dataclass(frozen=True)
class VideoStartReport:
    """How a video model was initialised: the load, the source kind, its (T', H, W) position grid, the head."""

    load: LoadReport
    source: str  # "image" (inflated) or "video"
    source_grid: tuple[int, int, int]  # the checkpoint's pos grid; (1, g, g) for an image
    head: str  # "loaded", "indexed", "reinitialised" or "new" (the checkpoint has none)


def _check_model_size(model: EvaVideoClassifier, state: Mapping[str, torch.Tensor]) -> None:
    """A checkpoint of another depth or width is refused first, naming both sizes, instead of a list of keys."""
    weight = state.get("patch_embed.proj.weight")
    if weight is None or "pos_embed" not in state:
        missing = [k for k in ("patch_embed.proj.weight", "pos_embed") if k not in state]
        raise CheckpointError(f"not an EVA checkpoint: no {missing} (keys: {listed(sorted(state))})")
    got = (block_count(state), int(weight.shape[0]))
    want = (len(model.blocks), model.config.embed_dim)
    if got != want:
        raise CheckpointError(
            f"checkpoint is a model of depth {got[0]} and width {got[1]}, {type(model).__name__} has depth {want[0]} "
            f"and width {want[1]}: a checkpoint of another model size; build the model with the checkpoint's config"
        )


def _head_rows(class_index: Sequence[int] | torch.Tensor, rows: int, num_classes: int) -> torch.Tensor:
    """``class_index`` checked as one source-head row per target class, as a long tensor."""
    values = class_index.tolist() if hasattr(class_index, "tolist") else list(class_index)
    wrong = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
    if wrong:
        raise CheckpointError(
            f"class_index must list integer rows of the checkpoint head, one per target class; got {wrong[:3]!r} "
            "(a boolean mask is not accepted: give the indices)"
        )
    if len(values) != num_classes:
        raise CheckpointError(f"class_index has {len(values)} entries but the model has {num_classes} classes")
    bad = [f"class {j} -> row {int(i)}" for j, i in enumerate(values) if not 0 <= i < rows]
    if bad:
        raise CheckpointError(
            f"class_index out of range for a checkpoint head of {rows} rows (valid 0..{rows - 1}): {listed(bad)}"
        )
    return torch.tensor([int(v) for v in values], dtype=torch.long)


def _select_head(
    model: EvaVideoClassifier,
    state: dict[str, torch.Tensor],
    class_index: Sequence[int] | torch.Tensor | None,
    reinit_head: bool,
) -> str:
    """Apply the head choice to ``state`` in place; returns what happened to it."""
    if class_index is not None and reinit_head:
        raise ValueError("give class_index or reinit_head, not both")
    if "head.weight" not in state:
        if class_index is not None:
            raise CheckpointError("class_index given but the checkpoint has no head (head.weight, head.bias)")
        return "new"
    if reinit_head:
        for key in HEAD_KEYS:
            state.pop(key, None)
        return "reinitialised"
    rows = state["head.weight"].shape[0]
    if class_index is not None:
        index = _head_rows(class_index, rows, model.num_classes)
        for key in HEAD_KEYS:
            state[key] = state[key][index]
        return "indexed"
    if rows != model.num_classes:
        raise CheckpointError(
            f"checkpoint head has {rows} classes, the model {model.num_classes}: pass class_index (the source row "
            "of each target class, e.g. the K722 -> K400 mapping) or reinit_head=True for a fresh head"
        )
    return "loaded"


def _source_grid(
    model: EvaVideoClassifier, pos: torch.Tensor, tubelet: int, source_frames: int | None
) -> tuple[int, int, int]:
    """(T', H, W) of a video checkpoint's positions: T' from ``source_frames``, else the spatial grid is assumed to
    be the model's."""
    tokens = pos.shape[1] - 1
    if source_frames is not None:
        check_video_fields(source_frames, tubelet)
        frames = source_frames // tubelet
        if tokens % frames:
            raise CheckpointError(f"pos_embed has {tokens} patch positions, not {frames} frames of a patch grid")
        side = _square_side(tokens // frames, f"each of the checkpoint's {frames} frames")
        return frames, side, side
    per_frame = model.num_patches_per_frame
    if tokens % per_frame:
        raise CheckpointError(
            f"pos_embed has {tokens} patch positions, not whole frames of the model's {per_frame} patches: a "
            "checkpoint at another image size; pass source_frames (its frame count) to resize it"
        )
    return (tokens // per_frame, *model.patch_embed.grid_size)


def load_video_start(
    model: EvaVideoClassifier,
    state_or_checkpoint: str | os.PathLike | Mapping[str, object],
    *,
    class_index: Sequence[int] | torch.Tensor | None = None,
    reinit_head: bool = False,
    source_frames: int | None = None,
    weights_only: bool = True,
) -> VideoStartReport:
    """Initialise ``model`` from an image checkpoint (MIM or classifier: inflated) or a video checkpoint (its
    pos_embed resized trilinearly to the model's frames and grid), file or mapping in the official format.

    The head is loaded as is when it fits; its rows picked by ``class_index`` (the source row of each target class,
    e.g. K722 -> K400, as the official ``CLASS_MAPPING``); or dropped with ``reinit_head``. A video checkpoint's frame
    count is read from its ``video`` entry or ``source_frames``; without either its spatial grid is taken to be the
    model's. Only fc_norm/head may be missing and only the MIM-only tensors unexpected; a checkpoint of another model
    size is refused naming both sizes. For a classifier checkpoint's EMA pass ``{"model": checkpoint.released}``.
    """
    if not isinstance(state_or_checkpoint, Mapping):
        state_or_checkpoint = torch.load(Path(state_or_checkpoint), map_location="cpu", weights_only=weights_only)
    meta = state_or_checkpoint.get(VIDEO_KEY)
    if source_frames is None and isinstance(meta, Mapping):
        source_frames = meta.get("num_frames")
    # fp32 copies (exact for fp16/bf16) so inflation and resizing round once, when the load casts to the model dtype.
    state = {
        k: v.to(torch.promote_types(v.dtype, torch.float32)) if v.is_floating_point() else v
        for k, v in extract_state_dict(state_or_checkpoint).items()
    }
    _check_model_size(model, state)
    head = _select_head(model, state, class_index, reinit_head)
    weight, pos = state["patch_embed.proj.weight"], state["pos_embed"]
    _check_pos_embed(pos)
    if weight.ndim == 4:
        side = _square_side(pos.shape[1] - 1, "the image pos_embed")
        source, grid = "image", (1, side, side)
        state = inflate_image_state(state, model.num_frames, model.tubelet, grid=model.patch_embed.grid_size)
    elif weight.ndim == 5:
        if weight.shape[2] != model.tubelet:
            raise CheckpointError(
                f"checkpoint has tubelet {weight.shape[2]}, the model {model.tubelet}: start from the image "
                "checkpoint to inflate to another tubelet"
            )
        source, grid = "video", _source_grid(model, pos, model.tubelet, source_frames)
        new_grid = (model.temporal_size, *model.patch_embed.grid_size)
        state["pos_embed"] = resample_video_pos_embed(pos, grid, new_grid)
    else:
        raise CheckpointError(f"patch_embed.proj.weight has shape {tuple(weight.shape)}: neither Conv2d nor Conv3d")
    check_start_keys(model, state)
    report = load_official_checkpoint(model, state, strict=False)
    return VideoStartReport(load=report, source=source, source_grid=grid, head=head)
