"""Typed, validated parameter blocks: one pydantic model per ``conf/*/parameters_<pipeline>.yml`` top-level key.

Kedro validates a node's ``params:<block>`` input against these before any node runs, so a typo or an impossible
value stops the run with a message naming the field. The library takes the same frozen objects; nothing below
re-validates.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _refuse_moved(data: Any, where: str, moved: dict[str, str]) -> Any:
    """A key that was a parameter and is now a catalog entry: refused with where it went (``extra="forbid"`` alone
    would only say it is not permitted)."""
    if isinstance(data, dict):
        found = [key for key in moved if key in data]
        if found:
            raise ValueError(
                "; ".join(f"{where}.{key} is no longer a parameter: {moved[key]}" for key in found)
                + " (conf/<env>/catalog.yml; remove the key from the parameters)"
            )
    return data


# ---------------------------------------------------------------------------------------------------- ingestion
class SourceParams(_Params):
    """One image source. ``kind`` selects the reader (``eva_pipeline.ingest.scan.source_kinds()`` lists them)."""

    name: str = Field(min_length=1)
    kind: Literal["idx", "image_folder", "file_list", "webdataset"]
    split: Literal["pretrain", "finetune", "probe", "eval"] = Field(
        description="pretrain; finetune (labelled, never pre-trained on); held out: probe, eval (evaluation only)"
    )
    images: Path
    labels: Path | None = None
    limit: int | None = Field(default=None, ge=1)
    layout: Literal["auto", "class_folders", "flat"] = Field(
        default="auto", description="image_folder only: class sub-folders (labelled) or a flat image folder"
    )
    classes: list[str] | None = Field(
        default=None,
        description="class names in label order (integer labels: idx, file_list, webdataset); null: '0', '1', ...",
    )

    @model_validator(mode="after")
    def _classes(self) -> SourceParams:
        """Refused here, before any node runs, as ``eva_pipeline.ingest.scan.SourceSpec`` refuses them."""
        if self.classes is None:
            return self
        if self.kind == "image_folder":
            raise ValueError(
                f"source {self.name!r}: an image_folder source's class names are its class folders, sorted (label i "
                "is the i-th folder); remove 'classes'"
            )
        if self.kind == "idx" and self.labels is None:
            raise ValueError(f"source {self.name!r}: 'classes' names the labels, but the idx source has no labels file")
        if not self.classes or not all(c.strip() for c in self.classes):
            raise ValueError(f"source {self.name!r}: 'classes' must be one or more non-empty names, got {self.classes}")
        if repeated := sorted(c for c, n in Counter(self.classes).items() if n > 1):
            raise ValueError(f"source {self.name!r}: class names must be unique, repeated: {repeated}")
        return self


class IngestionParams(_Params):
    """The sources merged into one manifest. Where the manifest, the rejections and the scan cache go: the catalog
    (``manifest``, ``ingestion_rejections``, ``ingestion_scan_cache``)."""

    sources: list[SourceParams] = Field(min_length=1)
    decode_workers: int = Field(
        default=2, ge=1, description="threads reading and decoding files/shards ahead of the in-order scan"
    )

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return _refuse_moved(
            data,
            "ingestion",
            {
                "cache_dir": "the scan cache is the catalog entry ingestion_scan_cache",
                "rejections_path": "the list of rejected items is the catalog entry ingestion_rejections",
            },
        )

    @model_validator(mode="after")
    def _unique_names(self) -> IngestionParams:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {dupes}")
        if not any(s.split == "pretrain" for s in self.sources):
            raise ValueError("at least one source must have split 'pretrain'")
        return self


# ---------------------------------------------------------------------------------------------------- model
class ModelParams(_Params):
    """A named EVA model (``eva_pipeline.models.list_models()``) and EvaConfig field overrides."""

    name: str
    overrides: dict[str, Any] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- teacher
class OpenClipTeacherOptions(_Params):
    """Options of the ``open_clip`` teacher (``eva_pipeline.teachers.OpenClipTeacher``; defaults are its own)."""

    model_name: str = "ViT-L-14"
    pretrained: str | None = Field(default="openai", description="a tag (needs its cached file) or a local path")
    image_size: int | tuple[int, int] | None = None
    precision: Literal["fp32", "fp16", "bf16", "pure_fp16", "pure_bf16"] = "fp32"
    quick_gelu: bool | None = None
    cache_dir: str | None = None


class EfficientNetLite0TeacherOptions(_Params):
    """Options of the ``efficientnet_lite0`` teacher (``eva_pipeline.teachers.EfficientNetLiteTeacher``)."""

    block_index: int = Field(default=10, ge=0)
    weights_path: str | None = None
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"


#: The typed options of each teacher kind: a teacher block is validated against the model of its ``kind``.
TEACHER_OPTIONS: dict[str, type[_Params]] = {
    "open_clip": OpenClipTeacherOptions,
    "efficientnet_lite0": EfficientNetLite0TeacherOptions,
}


class TeacherParams(_Params):
    """Which teacher produces the targets; ``options`` are that teacher class's keyword arguments.

    A config discriminated by ``kind``: ``options`` are checked against the kind's own options model, so an option
    of another kind (left over from a merge of two environments) is refused with its name, and every default is
    filled in (the receipt and the target store's fingerprint record the teacher completely).
    """

    kind: Literal["open_clip", "efficientnet_lite0"]
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _typed_options(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("kind") not in TEACHER_OPTIONS:
            return data  # the Literal check of `kind` reports it
        model = TEACHER_OPTIONS[data["kind"]]
        options = dict(data.get("options") or {})
        foreign = sorted(set(options) - set(model.model_fields))
        if foreign:
            raise ValueError(
                f"teacher kind '{data['kind']}' has no option(s) {foreign} (its options: "
                f"{', '.join(model.model_fields)}). An environment that changes the teacher kind must write the whole "
                f"teacher block, kind included: it then replaces the base block instead of merging into it "
                f"(conf/eva01/README.md)"
            )
        try:
            typed = model.model_validate(options)
        except ValidationError as exc:
            raise ValueError(f"teacher kind '{data['kind']}' options: {exc}") from None
        return {**data, "options": typed.model_dump()}


class DistributedParams(_Params):
    """How ranks are started when world_size > 1 (world_size 1 trains in the Kedro process)."""

    launcher: Literal["deepspeed", "torchrun"] = "deepspeed"
    hostfile: Path | None = Field(default=None, description="DeepSpeed hostfile for multi-node runs")
    master_addr: str | None = None
    master_port: int = Field(default=29500, ge=1, le=65535)


class ValidationSetParams(_Params):
    """The held-out images of the validation MIM loss (eva_pipeline.training.validation); their targets are stored."""

    split: Literal["probe"] = Field(default="probe", description="a held-out split, never trained on")
    num_images: int = Field(default=1000, ge=0, description="evenly spaced images of the split; 0: no validation")


class TeacherTargetsParams(_Params):
    """How the teacher's targets are made. Where they are stored: the catalog (``teacher_targets``)."""

    teacher: TeacherParams
    mode: Literal["cached", "online"] = "cached"
    batch_size: int = Field(default=256, ge=1)
    shard_size: int = Field(default=2048, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    views_per_image: int = Field(
        default=0,
        ge=0,
        description="0: one target per image, of the whole image (no augmentation); K >= 1: K augmented views per "
        "image (pretrain.augmentation), each stored with its crop; epoch e trains on view e % K",
    )
    world_size: int = Field(default=1, ge=1, description="extraction processes (one per GPU); each writes its shards")
    distributed: DistributedParams = DistributedParams()
    validation: ValidationSetParams = ValidationSetParams()

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return _refuse_moved(
            data, "teacher_targets", {"output_dir": "the target store is the catalog entry teacher_targets"}
        )


# ---------------------------------------------------------------------------------------------------- pretrain
class MaskingParams(_Params):
    """Block-wise masking (BEiT's ``MaskingGenerator``, EVA-01 ``masking_generator.py``)."""

    num_masking_patches: int = Field(ge=1)
    min_num_patches: int = Field(default=16, ge=1)
    max_num_patches: int | None = Field(default=None, ge=1)
    min_aspect: float = Field(default=0.3, gt=0)


class OptimizerParams(_Params):
    """AdamW and the warmup + cosine schedule (EVA paper, Sec. 2.2; EVA-01 ``run_eva_pretraining.py``)."""

    lr: float = Field(gt=0)
    min_lr: float = Field(ge=0)
    warmup_epochs: float = Field(ge=0)
    weight_decay: float = Field(ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(default=1e-6, gt=0)
    clip_grad: float | None = Field(default=3.0, gt=0)


class AugmentationParams(_Params):
    """EVA-01's pre-training view augmentation (flip p=0.5, RandomResizedCrop); student and teacher see the same
    view: the online teacher sees the student's crop, stored targets (teacher_targets.views_per_image >= 1) carry
    the crop they were made of."""

    enabled: bool = False
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = Field(default=0.5, ge=0, le=1)


class LoaderParams(_Params):
    """How training batches stream from the manifest (eva_pipeline.loader.batches)."""

    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes per rank (0: in-process)")


class LossScaleParams(_Params):
    """fp16 dynamic loss scaling (DeepSpeed's names)."""

    initial_scale_power: int = Field(default=16, ge=0)
    loss_scale_window: int = Field(default=500, ge=1)
    hysteresis: int = Field(default=2, ge=1)
    min_loss_scale: float = Field(default=1.0, gt=0)


class DeepSpeedParams(_Params):
    zero_stage: Literal[0, 1] = 1
    reduce_bucket_size: int = Field(default=500_000_000, ge=1)
    loss_scale: LossScaleParams = LossScaleParams()


class NonFiniteParams(_Params):
    """Recovery from non-finite losses/gradients: DeepSpeed skips such steps; a run stuck skipping is rolled back."""

    max_consecutive_skips: int = Field(default=20, ge=1)
    max_rollbacks: int = Field(default=3, ge=0)


class CheckpointParams(_Params):
    """How often training state is saved and how much is kept (the folder: the ``pretrain_checkpoints`` dataset)."""

    every_steps: int = Field(default=500, ge=1)
    keep_last: int = Field(default=2, ge=1)
    resume: Literal["auto", "never"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return _refuse_moved(
            data, "pretrain.checkpoint", {"dir": "the checkpoint folder is the catalog entry pretrain_checkpoints"}
        )


class PretrainValidationParams(_Params):
    """How often the held-out MIM loss is evaluated (the set itself: teacher_targets.validation)."""

    every_steps: int = Field(default=1000, ge=1, description="also evaluated after the last step")
    batch_size: int = Field(default=64, ge=1, description="images per forward pass on each rank")


class EngineParams(_Params):
    """What every training run over the DeepSpeed engine shares (pre-training and each fine-tune stage): epochs and
    global batch, precision and device, ranks, seed, ZeRO, checkpoints, non-finite recovery, logging, smoke cut-off."""

    loader: LoaderParams = LoaderParams()
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="global batch size (all ranks)")
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    compile: bool = Field(default=False, description="torch.compile the model through DeepSpeed (GPU runs)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    world_size: int = Field(default=1, ge=1)
    distributed: DistributedParams = DistributedParams()
    seed: int = 0
    deepspeed: DeepSpeedParams = DeepSpeedParams()
    checkpoint: CheckpointParams = CheckpointParams()
    nonfinite: NonFiniteParams = NonFiniteParams()
    log_every_steps: int = Field(default=10, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop early (smoke runs); the schedule is unchanged")

    @model_validator(mode="after")
    def _batch_divides(self) -> EngineParams:
        if self.batch_size % self.world_size:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by world_size {self.world_size}")
        return self


class PretrainParams(EngineParams):
    model: ModelParams
    masking: MaskingParams
    optimizer: OptimizerParams
    augmentation: AugmentationParams = AugmentationParams()
    validation: PretrainValidationParams = PretrainValidationParams()
    mask_examples: int = Field(default=8, ge=1, description="images in the mask picture logged with the run")


# ---------------------------------------------------------------------------------------------------- fine-tuning
class StageDataParams(_Params):
    """The labelled images of a fine-tune stage: the rows of manifest sources, labelled by class name (the
    ``class_names`` of ingestion), so that sources with label spaces of their own (Fashion-MNIST, Animal-MNIST;
    IN-21K, IN-1K) combine by name into one label space, classes in order of first appearance."""

    sources: list[str] = Field(min_length=1)
    per_class: int | None = Field(
        default=None, ge=1, description="label budget: the first k images of each class (manifest order); null: all"
    )


class FinetuneAugmentationParams(_Params):
    """EVA-01 ``build_transform`` for training (timm ``create_transform``): RandomResizedCrop, flip, RandAugment."""

    scale: tuple[float, float] = (0.08, 1.0)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    hflip: float = Field(default=0.5, ge=0, le=1)
    re_prob: float = Field(default=0.0, ge=0, le=1, description="random erasing (0 in both EVA stages)")


class MixingParams(_Params):
    """CutMix / Mixup (timm ``Mixup``, per batch) and label smoothing; the loss follows (soft-target CE or LS-CE)."""

    cutmix_alpha: float = Field(default=0.0, ge=0)
    mixup_alpha: float = Field(default=0.0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)


class EmaParams(_Params):
    """EMA of the weights (timm ``ModelEmaV3``), updated after every applied step; saved as ``model_ema``.

    ``run_fraction``: use a decay whose averaging window is that fraction of the run (at most ``decay``) instead
    of ``decay`` itself: 0.9999 averages ~10,000 steps, longer than a short run (finetune.ema.decay_for_run)."""

    enabled: bool = False
    decay: float = Field(default=0.9999, ge=0, lt=1)
    warmup: bool = Field(default=False, description="timm's warm-up: decay_k = min(decay, 1 - k^-2/3)")
    run_fraction: float | None = Field(default=None, gt=0, le=1)


class FinetuneOptimizerParams(OptimizerParams):
    """AdamW with layer-wise LR decay: layer i's LR is scaled by ``layer_decay ** (depth + 1 - i)``."""

    layer_decay: float = Field(gt=0, le=1)
    warmup_lr: float = Field(default=0.0, ge=0, description="LR at the first warmup step (EVA-01 21K stage: 1e-6)")


class FinetuneValidationParams(_Params):
    """Top-1 on held-out labelled images, logged during training (EVA-01's 21K stage evaluates nothing)."""

    sources: list[str] = Field(default_factory=list, description="held-out sources; empty: no validation")
    num_images: int = Field(default=1000, ge=1, description="evenly spaced images of those sources")
    every_steps: int = Field(default=1000, ge=1, description="also evaluated after the last step")
    batch_size: int = Field(default=256, ge=1)


class FinetuneParams(EngineParams):
    """One image fine-tune stage (EVA-01 ``run_class_finetuning.py``). The architecture is the student's
    (``student_config``) at ``img_size``; the head has one row per class of ``data``."""

    img_size: int = Field(ge=1, description="must be divisible by the student's patch size")
    data: StageDataParams
    optimizer: FinetuneOptimizerParams
    augmentation: FinetuneAugmentationParams = FinetuneAugmentationParams()
    mixing: MixingParams = MixingParams()
    ema: EmaParams = EmaParams()
    validation: FinetuneValidationParams = FinetuneValidationParams()
    drop_path_rate: float = Field(default=0.4, ge=0, lt=1)
    freeze_patch_embed: bool = True
    head_init_scale: float = Field(
        default=1e-3, gt=0, description="a new head's trunc-normal(0.02) init times this (EVA's --init_scale 0.001)"
    )
    grad_checkpointing: bool = Field(default=False, description="activation checkpointing of the blocks")
    crop_pct: float = Field(default=1.0, gt=0, le=1, description="evaluation resize: size / crop_pct, centre crop")
    head: Literal["by_name", "reinit"] = Field(
        default="by_name",
        description="a start checkpoint's head: rows taken by class name (a class it lacks is an error), or dropped",
    )

    @model_validator(mode="after")
    def _even_mixing_batch(self) -> FinetuneParams:
        mixing = self.mixing.cutmix_alpha > 0 or self.mixing.mixup_alpha > 0
        if mixing and (self.batch_size // self.world_size) % 2:
            raise ValueError(
                f"CutMix/Mixup pairs image i with image B-1-i: the per-rank batch {self.batch_size // self.world_size} "
                "must be even"
            )
        return self


#: Where a target-stage run starts: the intermediate model, the pre-trained student, or random init (a baseline).
FinetuneStart = Literal["intermediate", "student", "random"]


class TargetFinetuneParams(FinetuneParams):
    """The target stage (IN-1K): one run per start in ``runs``, same budget each; the first is the released model."""

    runs: list[FinetuneStart] = Field(default_factory=lambda: ["intermediate", "student", "random"], min_length=1)

    @model_validator(mode="after")
    def _unique_runs(self) -> TargetFinetuneParams:
        if len(set(self.runs)) != len(self.runs):
            raise ValueError(f"finetune.runs repeats a start: {self.runs}")
        return self


# ------------------------------------------------------------------------------------------- classification eval
class EvalSetParams(_Params):
    """One evaluation set of the classification table: labelled rows of manifest sources, optionally rendered,
    selected or relabelled. ``kind`` marks it real (real images, possibly selected) or synthetic (computed)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["real", "synthetic"] = "real"
    sources: list[str] = Field(min_length=1)
    rendition: Literal["none", "sketch", "inverted"] = "none"
    natural_adversarial: bool = Field(
        default=False, description="keep the images the reference classifier (on reference_sources) gets wrong"
    )
    classes: list[str] | None = Field(
        default=None, description="keep these classes only and score over them (A/R style); null: every class"
    )
    score_over_set_classes: bool = Field(
        default=False, description="restrict the head to the classes the set's images have (IN-A/IN-R: 200 of 1000)"
    )
    real_labels: Path | None = Field(default=None, description="ReaL json: multi-label correctness (timm's file)")
    class_map: Path | None = Field(
        default=None, description="ObjectNet: JSON {set class: [model classes]}; correct when the top-1 is one of them"
    )
    in_average: bool = Field(default=True, description="part of the robustness average (ObjectNet is not)")
    max_images: int | None = Field(default=None, ge=1, description="evenly spaced images; null: the default")


class ClassificationEvalParams(_Params):
    """The classification table: every fine-tuned run scored on every set through the evaluation transform.

    ``target``: the set whose top-1 is the headline (IN-1K val); the robustness average is the mean top-1 over the
    sets with ``in_average`` (the target included, as the paper does) and the gap is target top-1 minus it."""

    target: str
    sets: list[EvalSetParams] = Field(min_length=1)
    reference_sources: list[str] = Field(
        default_factory=list, description="training images of the natural-adversarial reference classifier"
    )
    max_images: int | None = Field(default=1000, ge=1, description="per set, evenly spaced; null: all")
    batch_size: int = Field(default=256, ge=1)
    use_ema: bool = Field(default=True, description="score the EMA weights when a run kept them (the released ones)")
    raw_pixels: bool = Field(
        default=False,
        description="add a row: logistic regression on the raw pixels of the target stage's training images "
        "(small images only)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    @model_validator(mode="after")
    def _target_is_a_set(self) -> ClassificationEvalParams:
        names = [s.name for s in self.sets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"evaluation set names must be unique, repeated: {dupes}")
        if self.target not in names:
            raise ValueError(f"target {self.target!r} is not one of the sets {names}")
        if any(s.natural_adversarial for s in self.sets) and not self.reference_sources:
            raise ValueError("a natural_adversarial set needs reference_sources (the reference classifier's images)")
        return self


# ---------------------------------------------------------------------------------------------------- video
#: K400/K600 class names renamed in K700 (old -> new). Checked against the class lists of the public EVA code
#: (``EVA-01/video/labels/kinetics{400,600,700,722}_labels.csv``): K400 has "changing wheel" and "cooking sausages",
#: K600 "passing american football (not in game)" (lower-case a); K700 and K722 spell them as below, and with these
#: three aliases the union of the K400/K600/K700 lists is exactly the 722 names of ``kinetics722_labels.csv`` (725
#: without). Other near-duplicates ("opening bottle" vs "opening bottle (not wine)", "dying hair" vs "dyeing hair")
#: are separate classes in K722 and must stay so, or the class count is not 722.
KINETICS_ALIASES: dict[str, str] = {
    "changing wheel": "changing wheel (not on bike)",
    "cooking sausages": "cooking sausages (not on barbeque)",
    "passing american football (not in game)": "passing American football (not in game)",
}


class KineticsVersionParams(_Params):
    """One Kinetics version as users have it: a folder of annotation CSVs (``train.csv``, ``validate.csv`` or
    ``val.csv``, ``test.csv``; columns ``label, youtube_id, time_start, time_end, split``) and a clip folder (the
    downloader's ``<split>/<label>/<youtube_id>_<start>_<end>.mp4``, or flat)."""

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="e.g. k400; the dataset name in the clip manifest")
    annotations: Path
    clips: Path


class SyntheticVideoParams(_Params):
    """The embedded demo's Moving Fashion-MNIST (``eva_pipeline.ingest.moving_fashion_mnist``): real H.264 clips of
    Fashion-MNIST items moving along eight paths, in three Kinetics-style versions, generated into ``out_dir``
    (deterministic and checksummed; a DVC output, not committed)."""

    out_dir: Path
    train_images: Path
    train_labels: Path
    test_images: Path
    test_labels: Path
    frames: int = Field(default=16, ge=2)
    size: int = Field(default=28, ge=8, description="canvas height in pixels (even: H.264 in yuv420p)")
    width: int | None = Field(
        default=None,
        ge=8,
        description="canvas width (even, >= size); null: square. Wider frames make the 3 test "
        "crops differ, as on Kinetics",
    )
    item_size: int = Field(default=14, ge=4)
    fps: int = Field(default=8, ge=1)
    train_per_class: int = Field(default=40, ge=1)
    validate_per_class: int = Field(default=10, ge=1)
    leaks_per_class: int = Field(default=1, ge=0, description="validation clips of one version in another's train")
    seed: int = 0


class VideoIngestionParams(_Params):
    """The Kinetics versions merged into Kinetics-722 (``eva_pipeline.ingest.kinetics``): one clip manifest with a
    ``k722`` dataset (the union, leakage removed) and each version, and the K722 -> version class mapping."""

    synthetic: SyntheticVideoParams | None = Field(default=None, description="generate the demo's clips first")
    versions: list[KineticsVersionParams] = Field(min_length=1)
    aliases: dict[str, str] = Field(default_factory=lambda: dict(KINETICS_ALIASES))
    min_frames: int = Field(default=1, ge=1, description="shorter clips are rejected (the most frames a stage samples)")
    workers: int = Field(default=8, ge=1, description="threads probing clips (each decoded once, frames counted)")

    @model_validator(mode="after")
    def _unique_versions(self) -> VideoIngestionParams:
        names = [v.name for v in self.versions]
        if len(set(names)) != len(names) or "k722" in names:
            raise ValueError(f"version names must be unique and not 'k722' (the merged set): {names}")
        return self


class VideoStageDataParams(_Params):
    """The clips a video stage trains on: one dataset of the clip manifest (``k722`` or a version)."""

    dataset: str = Field(min_length=1)
    per_class: int | None = Field(default=None, ge=1, description="label budget: the first k clips of each class")


class VideoAugmentationParams(_Params):
    """EVA-01 video training transform: TSN sampling, MultiScaleCrop + flip (+ colour jitter, grayscale)."""

    sampling: Literal["tsn", "strided"] = Field(
        default="tsn",
        description="training frames: tsn (EVA: a random frame per segment) or strided (one random offset for all "
        "segments: evenly spaced frames, the motion kept)",
    )
    scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
    hflip: bool = Field(default=True, description="off where left/right motion is the label (a flip swaps them)")
    color_jitter: float = Field(default=0.0, ge=0, le=1, description="probability (official: 0.8)")
    grayscale: float = Field(default=0.0, ge=0, le=1, description="probability (official: 0.2)")
    normalize: Literal["imagenet", "clip"] = Field(
        default="imagenet", description="mean/std: ImageNet's as the official video code, or CLIP's as the images"
    )


class VideoValidationParams(_Params):
    """Top-1 of the 1x1 view on held-out clips of the stage's dataset, logged during training."""

    split: str | None = Field(default="validate", description="null: no validation")
    num_clips: int = Field(default=200, ge=1, description="evenly spaced clips of that split")
    every_steps: int = Field(default=1000, ge=1, description="also evaluated after the last step")
    batch_size: int = Field(default=32, ge=1)


#: Where a video run starts: the pre-trained student, the image intermediate (IN-21K) classifier as EVA does, or
#: random init (a baseline).
VideoStart = Literal["student", "image_intermediate", "random"]


class VideoFinetuneParams(FinetuneParams):
    """A video fine-tune stage (EVA-01 ``video``): the student's architecture as a space-time classifier of
    ``num_frames`` frames at ``img_size`` (Conv3d patch embedding, tubelet ``tubelet``), trained with the image
    stages' loop (layer-decayed AdamW, Mixup/CutMix on clips, EMA, resumable checkpoints)."""

    data: VideoStageDataParams  # type: ignore[assignment]
    augmentation: VideoAugmentationParams = VideoAugmentationParams()  # type: ignore[assignment]
    validation: VideoValidationParams = VideoValidationParams()  # type: ignore[assignment]
    num_frames: int = Field(ge=1)
    tubelet: int = Field(default=1, ge=1)
    freeze_patch_embed: bool = Field(default=False, description="EVA's video fine-tunes train the patch embedding")
    frame_cache_mb: int = Field(
        default=0,
        ge=0,
        description="keep decoded training clips in memory up to this many MiB (per process), so later epochs do "
        "not decode them again; 0: decode every time (Kinetics)",
    )
    runs: list[VideoStart] = Field(default_factory=lambda: ["student", "random"], min_length=1)

    @model_validator(mode="after")
    def _frames(self) -> VideoFinetuneParams:
        if self.num_frames % self.tubelet:
            raise ValueError(f"num_frames {self.num_frames} must be a multiple of tubelet {self.tubelet}")
        if len(set(self.runs)) != len(self.runs):
            raise ValueError(f"runs repeats a start: {self.runs}")
        return self


class TargetVideoFinetuneParams(VideoFinetuneParams):
    """The K400/K600/K700 stage: for each run of the intermediate stage and each target version, the K722 model
    (its head rows taken by the saved class mapping) fine-tuned on that version. ``data.dataset`` is unused."""

    targets: list[str] = Field(min_length=1, description="versions of video_ingestion, e.g. [k400, k600, k700]")
    epochs_per_target: dict[str, int] = Field(
        default_factory=dict, description="epochs of a target where it differs from ``epochs`` (EVA: K400 1, else 2)"
    )
    data: VideoStageDataParams = VideoStageDataParams(dataset="targets")  # type: ignore[assignment]


class VideoEvalParams(_Params):
    """Multi-view testing: ``num_clips`` uniform temporal clips x ``num_crops`` spatial crops, per-view softmax
    averaged (EVA: 4 x 3), against the single centre view of the middle clip (1x1)."""

    split: str = "validate"
    num_clips: int = Field(default=4, ge=1)
    num_crops: int = Field(default=3, ge=1)
    max_clips: int | None = Field(default=None, ge=1, description="per target, evenly spaced; null: all")
    batch_size: int = Field(default=8, ge=1, description="clips per forward (each with all its views)")
    use_ema: bool = True
    mirror_pairs: bool = Field(
        default=False,
        description="the Moving Fashion-MNIST checks: mirror rate (left/right, ...) and top-1 on the item group and on "
        "the motion apart",
    )
    raw_pixels: bool = Field(
        default=False,
        description="add a raw_pixels row: logistic regression on the pixels of each version's training clips (small "
        "clips only)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"


# ---------------------------------------------------------------------------------------------------- evaluation
class ProbeParams(_Params):
    """The linear probe: split, readout of the frozen tokens, standardisation, logistic regression.

    ``readout: concat`` (the default) keeps every patch token in place, as raw pixels keep every pixel, so the
    student is compared with its baselines on equal terms; ``mean`` averages them (BEiT's readout), which discards
    the layout the probe needs on 28 px images (benchmarks/README.md has both). ``standardize`` z-scores each
    feature with train statistics: MAE's BatchNorm without affine before the linear layer.
    """

    test_fraction: float = Field(default=0.4, gt=0, lt=1)
    seed: int = 0
    C: float = Field(default=1.0, gt=0)
    max_iter: int = Field(default=1000, ge=1)
    readout: Literal["concat", "mean"] = "concat"
    standardize: bool = True


class EvaluationParams(_Params):
    """Probe settings. The random-init baseline is the student at its training init (``pretrain.seed``)."""

    probe: ProbeParams = ProbeParams()
    batch_size: int = Field(default=256, ge=1)
    include_teacher: bool = True


# ---------------------------------------------------------------------------------------------------- the blocks
#: Every top-level parameter block (``conf/*/parameters_<block>.yml``) with the model that validates it.
PARAMETER_BLOCKS: dict[str, type[_Params]] = {
    "ingestion": IngestionParams,
    "teacher_targets": TeacherTargetsParams,
    "pretrain": PretrainParams,
    "evaluation": EvaluationParams,
    "finetune_intermediate": FinetuneParams,
    "finetune": TargetFinetuneParams,
    "classification_eval": ClassificationEvalParams,
    "video_ingestion": VideoIngestionParams,
    "finetune_video_intermediate": VideoFinetuneParams,
    "finetune_video": TargetVideoFinetuneParams,
    "video_eval": VideoEvalParams,
}
