"""CIFAR data: read once from whichever layout the user has, cache as uint8, augment on the device.

Layouts understood (``--data PATH``):

* an ImageFolder tree ``train/<class>/*.jpg|png`` and ``test/<class>/...``, as a folder or packed in a
  ``.tar.gz`` (this project's JPEG-encoded CIFAR-10 archive is one);
* the official python layout, ``cifar-10-batches-py`` or ``cifar-100-python`` (what torchvision's
  ``CIFAR10``/``CIFAR100`` download), given as that folder or its parent.

Decoded splits are cached under ``--cache-dir`` as safetensors keyed by the source's checksum, so the
second run starts at once and every record can name the exact data it saw.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity

_SHIPPED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
# The JPEG archive beside the checkout when it is there (so the default works from any folder), else
# the same path relative to where the command runs.
DEFAULT_DATA = str(_SHIPPED_DATA) if _SHIPPED_DATA.is_file() else "../shared/data/cifar10-jpeg.tar.gz"


def add_data_arguments(parser: Any) -> None:
    """``--data`` and ``--cache-dir``, the same on every command that reads CIFAR (a parser or a group)."""
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="CIFAR source: ImageFolder folder or .tar.gz, or the official cifar-10-batches-py "
                             "(or cifar-100-python) folder (default: %(default)s)")
    parser.add_argument("--cache-dir", default="data-cache", help="where decoded splits are cached "
                        "(default: %(default)s)")

Split = Literal["train", "test"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass(frozen=True)
class Dataset:
    """A whole split in memory: ``images`` uint8 ``[N, 3, H, W]``, ``labels`` int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str
    checksum: str
    encoding: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, count: int | None, seed: int = 0) -> Dataset:
        """The first ``count`` images of a fixed random permutation (all of them if ``count`` is None)."""
        if count is None or count >= len(self):
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count]
        return self._take(order)

    def hold_out(self, count: int, seed: int) -> tuple[Dataset, Dataset]:
        """``(held_out, rest)``: ``count`` images of a fixed random permutation, and all the others in their
        original order, so a validation split never overlaps training and ``count == 0`` changes nothing."""
        if count <= 0:
            return self._take(torch.zeros(0, dtype=torch.long)), self
        if count >= len(self):
            raise ValueError(f"cannot hold out {count} of {len(self)} images and train on the rest")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self._take(order[:count].sort().values), self._take(order[count:].sort().values)

    def _take(self, index: torch.Tensor) -> Dataset:
        return Dataset(self.images[index], self.labels[index], self.classes, self.source,
                       self.checksum, self.encoding)


def _fingerprint(path: Path) -> str:
    """SHA-256 of a file, or of a folder's (relative path, size) listing plus its data files."""
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _decode(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes to an HWC uint8 RGB array."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _from_members(members: list[tuple[str, bytes]], split: Split) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Build a split from (relative path, bytes) pairs laid out as ``split/class/file``."""
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    for name, data in members:
        parts = Path(name).parts
        if len(parts) >= 3 and parts[-3] == split and name.lower().endswith(IMAGE_SUFFIXES):
            by_class.setdefault(parts[-2], []).append((name, data))
    if not by_class:
        raise FileNotFoundError(f"no images under a '{split}/<class>/' folder")
    classes = tuple(sorted(by_class))  # ImageFolder's order; for CIFAR-10 it is the official label order
    images, labels = [], []
    for label, cls in enumerate(classes):
        for _, data in sorted(by_class[cls]):
            images.append(_decode(data))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


def _read_tar(path: Path, split: Split) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    members = []
    with tarfile.open(path, "r:*") as tar:
        for info in tar:
            if info.isfile() and f"{split}/" in info.name:
                f = tar.extractfile(info)
                if f is not None:
                    members.append((info.name, f.read()))
    return _from_members(members, split)


def _read_folder(path: Path, split: Split) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    root = path / split
    members = [(str(p.relative_to(path)), p.read_bytes()) for p in root.rglob("*") if p.is_file()]
    return _from_members(members, split)


def _official_release(folder: Path) -> type[CIFAR10]:
    """torchvision's description (file names, MD5s, label key) of the release a folder holds."""
    return CIFAR100 if folder.name == CIFAR100.base_folder else CIFAR10


def _official_folder(path: Path) -> Path | None:
    for release in (CIFAR10, CIFAR100):
        if path.name == release.base_folder:
            return path
        if (path / release.base_folder).is_dir():
            return path / release.base_folder
    return None


def _official_encoding(folder: Path) -> str:
    """Say whether the files are the published release, by torchvision's own MD5 list."""
    release = _official_release(folder)
    files = [*release.train_list, *release.test_list, [release.meta["filename"], release.meta["md5"]]]
    intact = all(check_integrity(str(folder / name), md5) for name, md5 in files)
    return f"official {release.__name__} (lossless; " + (
        "MD5s match the published release)" if intact else "MD5s differ from the published release)")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for the official CIFAR python batches that can build numpy arrays and nothing else."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return _ArrayUnpickler(f, encoding="latin1").load()


def _read_official(folder: Path, split: Split) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The python layout torchvision's CIFAR10/CIFAR100 read (file lists from torchvision), parsed
    with a restricted unpickler: torchvision's own reader unpickles without restriction."""
    release = _official_release(folder)
    files = release.train_list if split == "train" else release.test_list
    classes = tuple(_unpickle(folder / release.meta["filename"])[release.meta["key"]])
    data, labels = [], []
    for name, _md5 in files:
        batch = _unpickle(folder / name)
        data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(batch["labels"] if "labels" in batch else batch["fine_labels"])
    return np.concatenate(data), np.asarray(labels, dtype=np.int64), classes


def describe_layout(path: Path) -> str:
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return "imagefolder-tar"
    if path.is_dir() and _official_folder(path) is not None:
        return "official"
    if path.is_dir() and ((path / "train").is_dir() or (path / "test").is_dir()):
        return "imagefolder"
    raise FileNotFoundError(
        f"{path}: not a CIFAR source; expected an ImageFolder tree (folder or .tar.gz with train/ and test/) "
        "or the official cifar-10-batches-py / cifar-100-python folder")


def load_split(path: str | Path, split: Split, cache_dir: str | Path | None = "data-cache") -> Dataset:
    """Load one split of the CIFAR data at ``path``, decoding it only the first time."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (--data takes the CIFAR JPEG archive, an "
                                f"ImageFolder tree, or the official cifar-10-batches-py / cifar-100-python folder)")
    layout = describe_layout(path)
    source = _official_folder(path) if layout == "official" else path
    assert source is not None
    checksum = _fingerprint(source)
    encoding = _official_encoding(source) if layout == "official" else _guess_encoding(path)
    cache = Path(cache_dir) / f"{checksum[:16]}-{split}.safetensors" if cache_dir else None
    if cache is not None and cache.is_file():
        tensors = load_file(str(cache))
        meta = json.loads((cache.with_suffix(".json")).read_text())
        return Dataset(tensors["images"], tensors["labels"], tuple(meta["classes"]), str(path), checksum, encoding)
    reader = {"imagefolder-tar": _read_tar, "imagefolder": _read_folder, "official": _read_official}[layout]
    images, labels, classes = reader(source, split)
    data = Dataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                   classes, str(path), checksum, encoding)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": data.images, "labels": data.labels}, str(cache))
        cache.with_suffix(".json").write_text(json.dumps({"classes": list(classes), "source": str(path)}))
    return data


def _guess_encoding(path: Path) -> str:
    return "JPEG" if "jpeg" in path.name.lower() or "jpg" in path.name.lower() else "as stored"


def augment(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, batched on the images' device."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=images.device)
    rows = (dy + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chan = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    flip = torch.rand(n, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` to float ``[0, 1]``."""
    return images.float().div_(255.0)
