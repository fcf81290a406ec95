"""Shared fixtures: tiny models and checkpoints made on the spot (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import ModelSpec, NoiseLayerSpec, SmoothingSpec, build_classifier, save_checkpoint
from models.resnet import Classifier

torch.set_num_threads(min(2, torch.get_num_threads()))


def require_tool(name: str, hint: str) -> str:
    """The path of a system tool a test needs. Missing: a skip on a developer's machine, but a failure
    under CI (``CI=true``), where .ci/run installs it, so a broken install step cannot pass as green."""
    import os
    import shutil

    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed ({hint})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; .ci/run should have installed it")
        pytest.skip(message)
    return path


def make_model(pni: str = "none", seed: int = 0, sigma: float = 0.25, samples: int = 8,
               aggregation: str = "softmax", space: str = "pixel") -> tuple[Classifier, ModelSpec]:
    """A randomly initialised ResNet-20 (eval mode) and its spec."""
    spec = ModelSpec(
        noise_layers=NoiseLayerSpec(type="none" if pni == "none" else "pni-w",
                                    mode="layer" if pni == "none" else pni),
        smoothing=SmoothingSpec(sigma=sigma, space=space, default_samples=samples, aggregation=aggregation),
    )
    torch.manual_seed(seed)
    return build_classifier(spec).eval(), spec


def make_lively_model(sigma: float = 0.5, seed: int = 0) -> tuple[Classifier, ModelSpec]:
    """A random ResNet-20 whose BatchNorm statistics are those of noisy random images, so that its answers move
    with the noise draw (a plain random ResNet-20 answers one class whatever its input): for tests of which
    copies an answer reads."""
    model, spec = make_model(sigma=sigma, seed=seed)
    norms = [layer for layer in model.modules() if isinstance(layer, torch.nn.BatchNorm2d)]
    for layer in norms:
        layer.momentum = None  # a plain average over the batch
    model.train()
    with torch.no_grad():
        images = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        model(images + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed + 1)))
    for layer in norms:
        layer.momentum = 0.1
    return model.eval(), spec


def saved_tiny(folder: Path, made: tuple[Classifier, ModelSpec]) -> Path:
    """``made`` written as a checkpoint named ``tiny`` into ``folder``."""
    model, spec = made
    save_checkpoint(folder, model, spec, name="tiny", training={"note": "random weights for tests"})
    return folder


@pytest.fixture
def lively_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint of :func:`make_lively_model` (sigma 0.5 pixel, m=8, softmax), named ``tiny``."""
    return saved_tiny(tmp_path / "lively", make_lively_model())


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A valid checkpoint folder with a random ResNet-20 (sigma 0.25 pixel, m=8, softmax)."""
    return saved_tiny(tmp_path / "tiny", make_model())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ResNet-20 checkpoint named ``tiny`` (sigma 0.25, m=8), shared by the tests of one module
    (the service tests serve it)."""
    model, spec = make_model()
    folder = tmp_path_factory.mktemp("served") / "tiny"
    save_checkpoint(folder, model, spec, name="tiny")
    return folder


def batch_tolerance(cpu: float) -> float:
    """How far one image's answer may move when it shares a batch. Its noise is the same either way; on CUDA
    cuDNN picks kernels by batch size (TF32 included), so the rounding differs (seen up to 7e-5 on an H100)."""
    return 1e-3 if torch.cuda.is_available() else cpu


CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 HWC images whose class shows as a bright horizontal band, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    images = rng.integers(0, 80, size=(n, 32, 32, 3), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i, 3 * y : 3 * y + 3, :, :] = 230
    return images, labels


@pytest.fixture(scope="session")
def tiny_cifar_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder tree (train 40/class, test 4/class, PNG) like the shared archive's layout."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cifar-folder") / "cifar10-png"
    for split, n, seed in (("train", 400, 0), ("test", 40, 1)):
        images, labels = synthetic_images(n, seed)
        for i, (img, y) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / CLASSES[y]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root


def packed(folder: Path, path: Path) -> Path:
    """``folder`` as a .tar.gz at ``path``, laid out as the shared archive is (``cifar10-png/train/...``)."""
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar10-png")
    return path


@pytest.fixture(scope="session")
def tiny_cifar_tar(tiny_cifar_folder: Path) -> Path:
    return packed(tiny_cifar_folder, tiny_cifar_folder.parent / "cifar10-png.tar.gz")


@pytest.fixture(scope="session")
def tiny_cifar_official(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official ``cifar-10-batches-py`` layout (pickled batches, as torchvision reads them)."""
    import pickle

    root = tmp_path_factory.mktemp("cifar-official") / "cifar-10-batches-py"
    root.mkdir()
    for name, n, seed in (("data_batch_1", 50, 0), ("test_batch", 20, 1)):
        images, labels = synthetic_images(n, seed)
        batch = {"data": images.transpose(0, 3, 1, 2).reshape(n, -1), "labels": labels.tolist()}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    for i in range(2, 6):  # torchvision wants all five training batches
        images, labels = synthetic_images(10, 10 + i)
        batch = {"data": images.transpose(0, 3, 1, 2).reshape(10, -1), "labels": labels.tolist()}
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CLASSES)}, protocol=2))
    return root
