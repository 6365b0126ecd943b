"""OpenCLIP vision tower as the EVA teacher (EVA paper, Sec. 2.2: OpenAI CLIP ViT-L/14): last-layer patch tokens
-> ``ln_post`` -> ``@ proj``.

Weights are resolved *before* the model is built and only from local files or caches, so a missing checkpoint
fails in well under a second with instructions instead of after minutes of hub retries or a 2.4 GB build.

Grid: the teacher's grid is ``image_size // patch_size``. When the student grid differs from the native one, build
the teacher with ``image_size=(patch*gh, patch*gw)``: open_clip then resizes the learned position embedding
bicubically while loading the checkpoint (``open_clip.model.resize_pos_embed``), the bicubic
pos-embed interpolation EVA-01 itself uses when a grid changes (fine-tuning at 336/560). A mismatch at call time
raises ValueError saying so.
"""

from __future__ import annotations

import os

# Fail fast offline: huggingface_hub reads this at import time (environment.md: 46 s of retries otherwise).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import zipfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.transformer import VisionTransformer
from torch import Tensor

from eva_pipeline.loader.transforms import CLIP_MEAN, CLIP_STD
from eva_pipeline.teachers.base import Teacher, TeacherWeightsUnavailable, freeze

DEFAULT_MODEL_NAME: str = "ViT-L-14"
DEFAULT_PRETRAINED: str = "openai"
DEFAULT_DEVICE: str = "cpu"
DEFAULT_PRECISION: str = "fp32"
#: Where open_clip's URL downloader caches files (``download_pretrained_from_url``).
OPEN_CLIP_URL_CACHE: Path = Path("~/.cache/clip")
#: Marker file of a TorchScript archive (as ``torch.serialization._is_torchscript_zip`` checks).
TORCHSCRIPT_MARKER: str = "constants.pkl"


@dataclass(frozen=True)
class ResolvedWeights:
    """Where the checkpoint lies on disk and how the architecture must be built for it."""

    path: str | None
    quick_gelu: bool
    weights_only: bool


def _is_torchscript(path: str) -> bool:
    """OpenAI's original ``ViT-L-14.pt`` is a TorchScript archive; ``torch.load(weights_only=True)`` refuses it."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/" + TORCHSCRIPT_MARKER) or n == TORCHSCRIPT_MARKER for n in zf.namelist())


def _hf_candidates(hf_hub: str) -> tuple[str, list[str]]:
    """Repo id and file names open_clip would fetch for an ``hf_hub`` entry (safetensors first, like open_clip)."""
    repo_id, filename = os.path.split(hf_hub)  # 'org/repo/' -> default file name; 'org/repo/file.pt' -> that file
    if not filename:
        return repo_id, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    stem, ext = os.path.splitext(filename)
    return repo_id, ([stem + ".safetensors"] if ext in (".bin", ".pth") else []) + [filename]


def _hf_cache_dir(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _instructions(model_name: str, tag: str, cfg: dict, cache_dir: str | None) -> str:
    """How to supply the checkpoint on an offline machine (goes into the error message)."""
    lines = [
        f"How to supply `{model_name}` / `{tag}` weights offline:",
        f'  1. On a machine with internet: python -c "import open_clip; '
        f"open_clip.create_model('{model_name}', pretrained='{tag}')\"",
    ]
    if cfg.get("hf_hub"):
        repo_id, names = _hf_candidates(cfg["hf_hub"])
        lines.append(
            f"     which stores {' or '.join(names)} of the Hugging Face repo '{repo_id}' under "
            f"$HF_HOME/hub (default ~/.cache/huggingface/hub/models--{repo_id.replace('/', '--')}/snapshots/*/)."
        )
    if cfg.get("url"):
        lines.append(
            f"     (or download {cfg['url']} directly; open_clip caches it as "
            f"{OPEN_CLIP_URL_CACHE / os.path.basename(cfg['url'])})."
        )
    lines.append(
        "  2. Then EITHER copy that file here and set in conf `pretrained: /path/to/<file>` "
        "(.safetensors, .bin or .pt all load)"
    )
    if cfg.get("quick_gelu"):
        lines.append("     together with `quick_gelu: true` (these weights were trained with QuickGELU),")
    lines.append(
        f"     OR copy the whole ~/.cache/huggingface folder here and set HF_HOME to it (or its hub/ "
        f"subfolder and set HF_HUB_CACHE) before Python starts (looked in: {_hf_cache_dir(cache_dir)})."
    )
    return "\n".join(lines)


def resolve_weights(
    model_name: str,
    pretrained: str | None,
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
) -> ResolvedWeights:
    """Find a checkpoint on local disk without any network access, or raise TeacherWeightsUnavailable at once.

    ``pretrained``: None (random init, for tests), a file path, or an open_clip tag looked up in the Hugging Face
    cache and in open_clip's URL cache. ``quick_gelu`` None means: what the tag was trained with (False for files).
    """
    if pretrained is None:
        return ResolvedWeights(path=None, quick_gelu=bool(quick_gelu), weights_only=True)
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"Unknown open_clip model '{model_name}'. Known: {', '.join(open_clip.list_models())}")
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        path = Path(pretrained).expanduser()
        if path.is_file():
            return ResolvedWeights(str(path), bool(quick_gelu), weights_only=not _is_torchscript(str(path)))
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        default_cfg = open_clip.get_pretrained_cfg(model_name, DEFAULT_PRETRAINED)
        hint = _instructions(model_name, DEFAULT_PRETRAINED, default_cfg, cache_dir) if default_cfg else ""
        raise TeacherWeightsUnavailable(
            f"open_clip weights for '{model_name}': pretrained='{pretrained}' is neither an existing file nor a known "
            f"tag (tags: {', '.join(tags) or 'none'}).\n{hint}"
        )
    tag_quick_gelu = bool(cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    found: str | None = None
    if cfg.get("file") and Path(cfg["file"]).is_file():
        found = cfg["file"]
    if found is None and cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, names = _hf_candidates(cfg["hf_hub"])
        for name in names:
            hit = try_to_load_from_cache(repo_id=repo_id, filename=name, cache_dir=cache_dir)
            if isinstance(hit, str) and Path(hit).is_file():
                found = hit
                break
    if found is None and cfg.get("url"):
        url_file = (Path(cache_dir) if cache_dir else OPEN_CLIP_URL_CACHE).expanduser() / os.path.basename(cfg["url"])
        if url_file.is_file():
            found = str(url_file)
    if found is None:
        raise TeacherWeightsUnavailable(
            f"open_clip weights '{model_name}' / '{pretrained}' are not on this machine and there is no network.\n"
            + _instructions(model_name, pretrained, cfg, cache_dir)
        )
    return ResolvedWeights(found, tag_quick_gelu, weights_only=not _is_torchscript(found))


class OpenClipTeacher(Teacher):
    """Frozen OpenCLIP image tower; target per patch = ``ln_post(last-layer token) @ proj`` (cls dropped)."""

    mean = CLIP_MEAN  # CLIP normalisation equals the student's: no renormalisation.
    std = CLIP_STD

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL_NAME,
        pretrained: str | None = DEFAULT_PRETRAINED,
        image_size: int | tuple[int, int] | None = None,
        device: str = DEFAULT_DEVICE,
        precision: str = DEFAULT_PRECISION,
        quick_gelu: bool | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        weights = resolve_weights(model_name, pretrained, quick_gelu=quick_gelu, cache_dir=cache_dir)
        model = open_clip.create_model(
            model_name,
            pretrained=weights.path,
            precision=precision,
            device=device,
            force_quick_gelu=weights.quick_gelu,
            force_image_size=image_size,
            weights_only=weights.weights_only,
        )
        visual = model.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"{model_name}: only open_clip's VisionTransformer towers are supported")
        if visual.attn_pool is not None or visual.final_ln_after_pool or visual.pool_type != "tok":
            raise ValueError(f"{model_name}: tokens would not be ln_post(last layer) with a class token first")
        visual.output_tokens = True  # forward returns (pooled, ln_post(tokens)[:, 1:]); proj is applied here
        self.visual = freeze(visual)  # the text tower is not needed: drop it with `model`
        self.patch_size: tuple[int, int] = tuple(visual.patch_size)
        self.native_grid: tuple[int, int] = tuple(visual.grid_size)
        self.image_size: tuple[int, int] = tuple(visual.image_size)
        self.input_dtype_ = open_clip.get_input_dtype(precision)
        self.name = f"open_clip:{model_name}/{pretrained if weights.path else 'random'}"
        self.target_dim = int(visual.proj.shape[1])

    @property
    def input_dtype(self):  # type: ignore[override]
        """open_clip's mixed precision keeps LayerNorms fp32: the input dtype comes from the precision string."""
        return self.input_dtype_ or self.visual.conv1.weight.dtype

    def input_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        if tuple(grid) != self.native_grid:
            ph, pw = self.patch_size
            raise ValueError(
                f"{self.name}: teacher grid {self.native_grid} (image {self.image_size}, patch {self.patch_size}) "
                f"differs from the student grid {tuple(grid)}; build the teacher with "
                f"image_size=({ph * grid[0]}, {pw * grid[1]}) so the position embedding is bicubically resized."
            )
        return self.image_size

    def _tokens(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        _, tokens = self.visual(images)
        return tokens @ self.visual.proj
