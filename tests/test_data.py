"""Data readers (ImageFolder folder and tar.gz, official python layout) and device augmentation."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import CLASSES, synthetic_images
from training.data import augment, load_split


def _expected(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = synthetic_images(400 if split == "train" else 40, 0 if split == "train" else 1)
    return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels)


@pytest.mark.parametrize("layout", ["folder", "tar"])
def test_imagefolder_layouts(layout: str, tiny_cifar_folder: Path, tiny_cifar_tar: Path, tmp_path: Path) -> None:
    source = tiny_cifar_folder if layout == "folder" else tiny_cifar_tar
    data = load_split(source, "test", cache_dir=tmp_path)
    assert data.classes == CLASSES
    assert data.images.shape == (40, 3, 32, 32) and data.images.dtype == torch.uint8
    images, labels = _expected("test")
    # ImageFolder order is by class, then file name; compare as sets of (label, image) pairs.
    order = torch.argsort(labels, stable=True)
    assert torch.equal(data.labels, labels[order])
    assert torch.equal(data.images, images[order])


def test_cache_is_used_and_keyed_by_content(tiny_cifar_tar: Path, tmp_path: Path) -> None:
    first = load_split(tiny_cifar_tar, "train", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    second = load_split(tiny_cifar_tar, "train", cache_dir=tmp_path)
    assert torch.equal(first.images, second.images) and first.checksum == second.checksum


def test_official_python_layout(tiny_cifar_official: Path, tmp_path: Path) -> None:
    train = load_split(tiny_cifar_official.parent, "train", cache_dir=tmp_path)  # parent folder works too
    test = load_split(tiny_cifar_official, "test", cache_dir=tmp_path)
    assert len(train) == 50 + 4 * 10 and len(test) == 20 and test.classes == CLASSES
    images, labels = synthetic_images(20, 1)
    assert torch.equal(test.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(test.labels, torch.from_numpy(labels))
    assert test.encoding == "official CIFAR10 (lossless; MD5s differ from the published release)"  # synthetic files


def test_official_layout_refuses_code_in_pickles(tiny_cifar_official: Path, tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    folder = shutil.copytree(tiny_cifar_official, tmp_path / "cifar-10-batches-py")  # the fixture is shared
    (folder / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_split(folder, "test", cache_dir=None)


def test_unknown_layout_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a CIFAR source"):
        load_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_split(tmp_path / "missing.tar.gz", "train")


def test_augment_crops_and_flips_per_image() -> None:
    torch.manual_seed(0)
    images = torch.randint(1, 255, (64, 3, 32, 32), dtype=torch.uint8)
    out = augment(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    zero_rows = (out == 0).all(dim=(1, 3)).any(dim=1)  # padding shows as zero rows/cols
    assert 0 < int(zero_rows.sum()) < 64  # some images shifted, not all the same way
    unchanged = (out == images).flatten(1).all(1)
    flipped = (out == images.flip(3)).flatten(1).all(1)
    assert int(unchanged.sum() + flipped.sum()) < 64
