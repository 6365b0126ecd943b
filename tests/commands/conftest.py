"""Fixtures of the ``eva-pipeline`` command tests: real Fashion-MNIST images as PNG files, tiny checkpoints of every
kind the commands read (written in tmp_path), and a runner that invokes the console script's group in process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image
from torch import nn

from eva_pipeline.ingest.readers.idx import read_idx
from eva_pipeline.models import (
    ClassifierCheckpoint,
    EvaClassifier,
    EvaMIM,
    create_classifier,
    create_model,
    save_classifier_checkpoint,
    save_official_checkpoint,
)

RAW = Path(__file__).resolve().parents[2] / "data" / "01_raw" / "fashion_mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# 2 blocks, 2 heads (no registered model has this shape: the heads must be given), 28 px, 7 x 7 grid.
TINY = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_hidden_dim": 64, "drop_path_rate": 0.0}
NUM_IMAGES = 6


def perturb(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Noise on every parameter: unit LayerNorms and zero biases would hide a swapped norm or bias."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
    return model.eval()


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six held-out Fashion-MNIST images as PNG files, two of them in a subfolder (the scan is recursive)."""
    root = tmp_path_factory.mktemp("images")
    pixels = read_idx(RAW / "t10k-images-idx3-ubyte.gz")[:NUM_IMAGES]
    (root / "more").mkdir()
    for i, image in enumerate(pixels):
        folder = root / "more" if i >= 4 else root
        Image.fromarray(image).save(folder / f"fmnist_{i}.png")
    return root


@pytest.fixture
def images(image_dir: Path) -> list[Path]:
    """The images of ``image_dir`` in the order the commands list them (sorted paths)."""
    return sorted(image_dir.rglob("*.png"))


@pytest.fixture
def mim() -> EvaMIM:
    torch.manual_seed(0)
    return perturb(create_model("eva_tiny_patch4_28", target_dim=24, **TINY), seed=1)


@pytest.fixture
def mim_file(tmp_path: Path, mim: EvaMIM) -> Path:
    """The MIM student in the official format, fp32 (eva_student.pt's layout)."""
    return save_official_checkpoint(mim, tmp_path / "mim.pt", dtype=None)


@pytest.fixture
def classifiers() -> tuple[EvaClassifier, EvaClassifier]:
    """A classifier and its EMA copy (different weights, so the tests can tell which one was used)."""
    torch.manual_seed(0)
    model = perturb(create_classifier("eva_tiny_patch4_28", len(CLASSES), **TINY), seed=2)
    ema = perturb(create_classifier("eva_tiny_patch4_28", len(CLASSES), **TINY), seed=3)
    with torch.no_grad():  # a head large enough that the probabilities are not uniform
        for m in (model, ema):
            m.head.weight.mul_(200.0)
    return model, ema


@pytest.fixture
def classifier_file(tmp_path: Path, classifiers: tuple[EvaClassifier, EvaClassifier]) -> Path:
    """A fine-tuned classifier of this project (weights, EMA, class names, architecture)."""
    model, ema = classifiers
    return save_classifier_checkpoint(ClassifierCheckpoint.from_modules(model, CLASSES, ema), tmp_path / "clf.pt")


@pytest.fixture
def official_classifier_file(tmp_path: Path, classifiers: tuple[EvaClassifier, EvaClassifier]) -> Path:
    """An official EVA-01 fine-tuned file: ``{"model": ...}`` in fp16, no class names, no architecture."""
    return save_official_checkpoint(classifiers[0], tmp_path / "official_clf.pt", dtype=torch.float16)


@pytest.fixture
def student_config(tmp_path: Path) -> Path:
    """A student config as the pipeline writes it (``pretrain.model``: name and overrides)."""
    import yaml

    path = tmp_path / "student_config.yml"
    model = {"name": "eva_tiny_patch4_28", "overrides": dict(TINY)}
    path.write_text(yaml.safe_dump({"pretrain": {"model": model}}))
    return path


@pytest.fixture
def invoke() -> Callable[..., Result]:
    """Run ``eva-pipeline ARGS`` in process; exceptions other than click's exits are re-raised."""
    from eva_pipeline.commands import cli

    def run(*args: object, expect: int | None = 0) -> Result:
        result = CliRunner().invoke(cli, [str(a) for a in args])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        if expect is not None:
            assert result.exit_code == expect, result.output
        return result

    return run


@pytest.fixture
def preprocessed() -> Callable[..., torch.Tensor]:
    """The model inputs of image files as the commands make them (EVA's evaluation transform), built here from PIL
    and timm's transform directly."""
    from eva_pipeline.finetune.augment import eval_transform

    def run(paths: list[Path], size: int = 28) -> torch.Tensor:
        transform = eval_transform(size)
        return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])

    return run


@pytest.fixture
def class_names() -> list[str]:
    return list(CLASSES)
