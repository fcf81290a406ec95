"""Data readers (ImageFolder folder and tar.gz, official python layout) and device augmentation."""

from __future__ import annotations

import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import CLASSES, packed, synthetic_images
from training.data import Dataset, augment, load_split, to_float


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


def python2_pickle(obj: object) -> bytes:
    """``obj`` as Python 2's cPickle writes the official release's batches (protocol 2): its ``str`` as
    BINSTRING, raw bytes that Python 3 reads back only through the unpickler's ``encoding``, and numpy arrays
    through ``numpy.core.multiarray._reconstruct`` with their data as such a string. Python 3's own
    ``pickle.dumps`` never writes these opcodes, so the fixture's pickles cannot show the encoding matters."""

    def string(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b

    def write(o: object) -> bytes:
        if isinstance(o, str):
            return string(o.encode("latin1"))
        if isinstance(o, bool):
            return b"\x88" if o else b"\x89"
        if isinstance(o, int):
            return b"J" + struct.pack("<i", o)
        if o is None:
            return b"N"
        if isinstance(o, tuple):
            return b"(" + b"".join(map(write, o)) + b"t"
        if isinstance(o, list):
            return b"]" + b"".join(write(v) + b"a" for v in o)
        if isinstance(o, dict):
            return b"}" + b"".join(write(k) + write(v) + b"s" for k, v in o.items())
        assert isinstance(o, np.ndarray) and o.dtype == np.uint8, type(o)
        dtype = b"cnumpy\ndtype\n" + write(("u1", 0, 1)) + b"R" + write((3, "|", None, None, None, -1, -1, 0)) + b"b"
        return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"(cnumpy\nndarray\n" + write((0,)) + write("b") + b"tR"
                + b"(" + write(1) + write(o.shape) + dtype + write(False) + string(o.tobytes()) + b"tb")

    return b"\x80\x02" + write(obj) + b"."


def test_official_layout_reads_python_2_pickles_as_the_release_ships_them(tmp_path: Path) -> None:
    """The official cifar-10-batches-py files are Python 2 pickles: keys and pixel data are Python 2 strings,
    which Python 3 decodes as ASCII unless told otherwise (and the pixels are not ASCII)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, n, seed in (("test_batch", 20, 1), *((f"data_batch_{i}", 4, 10 + i) for i in range(1, 6))):
        images, labels = synthetic_images(n, seed)
        batch = {"batch_label": f"{name} of 5", "data": images.transpose(0, 3, 1, 2).reshape(n, -1),
                 "labels": labels.tolist(), "filenames": [f"img_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(python2_pickle(batch))
    (folder / "batches.meta").write_bytes(python2_pickle({"label_names": list(CLASSES), "num_cases_per_batch": 4}))
    with pytest.raises(UnicodeDecodeError):  # what Python 3 makes of it by default
        pickle.loads((folder / "test_batch").read_bytes())
    test = load_split(folder, "test", cache_dir=None)
    images, labels = synthetic_images(20, 1)
    assert torch.equal(test.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(test.labels, torch.from_numpy(labels)) and test.classes == CLASSES
    assert len(load_split(folder, "train", cache_dir=None)) == 20


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


def test_augment_is_a_crop_of_the_image_padded_by_4_at_every_offset_mirrored_or_not() -> None:
    """The CIFAR recipe: each output is a 32x32 crop of the image zero-padded by 4, at one of the 9 x 9
    offsets, mirrored half the time; over 512 images every offset and both mirrorings occur."""
    torch.manual_seed(1)
    images = torch.randint(1, 255, (512, 3, 32, 32), dtype=torch.uint8)
    out = augment(images)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    seen: set[tuple[str, int]] = set()
    for i in range(len(images)):
        found = [(dy, dx, mirrored) for dy in range(9) for dx in range(9) for mirrored in (False, True)
                 if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32].flip(2) if mirrored
                                else padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert len(found) == 1, i  # no shift beyond 4, and only one reading of each output
        dy, dx, mirrored = found[0]
        seen |= {("dy", dy), ("dx", dx), ("mirrored", mirrored)}
    assert seen == {("dy", k) for k in range(9)} | {("dx", k) for k in range(9)} | {("mirrored", False),
                                                                                 ("mirrored", True)}


def _indexed(n: int = 40) -> Dataset:
    """A split whose image ``i`` is filled with the value ``i`` and labelled ``i % 10``: what a subset or a
    holdout took, and whether each label travelled with its image, reads off the pixels."""
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 32, 32).contiguous()
    return Dataset(images, torch.arange(n) % 10, CLASSES, "made here", "sum", "as stored")


def _indices(data: Dataset) -> list[int]:
    index = data.images[:, 0, 0, 0].long()
    assert torch.equal(data.labels, index % 10)  # each label still with its image
    assert (data.classes, data.source, data.checksum, data.encoding) == (CLASSES, "made here", "sum", "as stored")
    return index.tolist()


def test_subset_is_a_fixed_random_choice_whose_smaller_sizes_are_its_first_images() -> None:
    """``siam compare`` pairs a run of n images with the first n of a larger one: that holds only if a subset
    of n is the first n of any larger subset with the same seed."""
    data = _indexed()
    ten = _indices(data.subset(10, seed=1))
    assert len(set(ten)) == 10 and ten == _indices(data.subset(10, seed=1))
    assert ten != sorted(ten)  # random, not the first ten
    assert _indices(data.subset(4, seed=1)) == ten[:4] and _indices(data.subset(39, seed=1))[:10] == ten
    assert _indices(data.subset(10, seed=2)) != ten
    assert data.subset(None) is data and data.subset(40) is data and data.subset(41) is data


def test_hold_out_splits_without_overlap_each_part_in_its_original_order() -> None:
    data = _indexed()
    held, rest = data.hold_out(12, seed=3)
    held_at, rest_at = _indices(held), _indices(rest)
    assert len(held_at) == 12 and sorted(held_at + rest_at) == list(range(40))
    assert held_at == sorted(held_at) and rest_at == sorted(rest_at)
    assert held_at != list(range(12))  # a random choice, not the first images
    assert _indices(data.hold_out(12, seed=3)[0]) == held_at and _indices(data.hold_out(12, seed=4)[0]) != held_at
    one, others = data.hold_out(1, seed=3)
    assert len(one) == 1 and len(others) == 39
    none, everything = data.hold_out(0, seed=3)
    assert len(none) == 0 and everything is data
    with pytest.raises(ValueError, match="cannot hold out 40 of 40 images"):
        data.hold_out(40, seed=3)


def test_cache_hit_returns_what_was_read_and_new_content_gets_a_new_entry(tiny_cifar_folder: Path,
                                                                          tmp_path: Path) -> None:
    fresh = load_split(tiny_cifar_folder, "test", cache_dir=None)
    load_split(tiny_cifar_folder, "test", cache_dir=tmp_path / "cache")
    cached = load_split(tiny_cifar_folder, "test", cache_dir=tmp_path / "cache")
    for a, b in ((fresh.images, cached.images), (fresh.labels, cached.labels)):
        assert torch.equal(a, b)
    assert (cached.classes, cached.checksum, cached.encoding) == (fresh.classes, fresh.checksum, fresh.encoding)
    changed = shutil.copytree(tiny_cifar_folder, tmp_path / "changed")
    first = sorted((changed / "test" / "cat").iterdir())[0]
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(first)
    other = load_split(changed, "test", cache_dir=tmp_path / "cache")
    assert other.checksum != fresh.checksum and len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    cat = CLASSES.index("cat")
    assert (other.images[other.labels == cat][0] == torch.tensor([255, 0, 0])[:, None, None]).all()
    # A folder's checksum covers its names: the last automobile moved to be the first bird leaves the bytes
    # in the same order, but not the labels, and the cache must not answer with the old ones.
    moved = shutil.copytree(tiny_cifar_folder, tmp_path / "moved")
    sorted((moved / "test" / "automobile").iterdir())[-1].rename(moved / "test" / "bird" / "0000.png")
    relabelled = load_split(moved, "test", cache_dir=tmp_path / "cache")
    assert relabelled.checksum != fresh.checksum and torch.equal(relabelled.images, fresh.images)
    assert (relabelled.labels != fresh.labels).sum() == 1


def test_an_archive_checksum_covers_its_contents(tiny_cifar_folder: Path, tmp_path: Path) -> None:
    """Two archives that differ in one image must not share a cache entry."""
    from PIL import Image

    changed = shutil.copytree(tiny_cifar_folder, tmp_path / "changed")
    Image.new("RGB", (32, 32), (0, 0, 255)).save(sorted((changed / "test" / "cat").iterdir())[0])
    archives = [packed(tiny_cifar_folder, tmp_path / "a.tar.gz"), packed(changed, tmp_path / "b.tar.gz")]
    first, second = (load_split(a, "test", cache_dir=tmp_path / "cache") for a in archives)
    assert first.checksum != second.checksum and not torch.equal(first.images, second.images)


def test_files_outside_split_class_file_are_ignored(tiny_cifar_folder: Path, tmp_path: Path) -> None:
    """Only ``<split>/<class>/<image>`` counts: not notes, nor images one folder too deep or too shallow."""
    messy = shutil.copytree(tiny_cifar_folder, tmp_path / "messy")
    (messy / "test" / "cat" / "notes.txt").write_text("not an image")
    (messy / "test" / "cat" / "thumbs").mkdir()
    shutil.copy(sorted((messy / "test" / "dog").iterdir())[0], messy / "test" / "cat" / "thumbs" / "0001.png")
    shutil.copy(sorted((messy / "test" / "dog").iterdir())[0], messy / "test" / "stray.png")
    clean, read = load_split(tiny_cifar_folder, "test", cache_dir=None), load_split(messy, "test", cache_dir=None)
    assert read.classes == clean.classes and torch.equal(read.labels, clean.labels)
    assert torch.equal(read.images, clean.images)


def test_official_cifar100_layout_reads_the_fine_labels(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    names = [f"class{i:03d}" for i in range(100)]
    (root / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": ["c"] * 20}))
    for split, n, seed in (("train", 30, 0), ("test", 12, 1)):
        images, _ = synthetic_images(n, seed)
        fine = [(7 * i + seed) % 100 for i in range(n)]
        batch = {"data": images.transpose(0, 3, 1, 2).reshape(n, -1), "fine_labels": fine,
                 "coarse_labels": [f // 5 for f in fine]}
        (root / split).write_bytes(pickle.dumps(batch, protocol=2))
    test = load_split(tmp_path, "test", cache_dir=None)
    assert test.classes == tuple(names) and test.labels.tolist() == [(7 * i + 1) % 100 for i in range(12)]
    assert torch.equal(test.images, torch.from_numpy(synthetic_images(12, 1)[0]).permute(0, 3, 1, 2))
    assert len(load_split(root, "train", cache_dir=None)) == 30
    assert test.encoding.startswith("official CIFAR100")


def test_to_float_maps_0_255_onto_0_1() -> None:
    out = to_float(torch.tensor([0, 51, 255], dtype=torch.uint8))
    assert out.dtype == torch.float32 and out.tolist() == pytest.approx([0.0, 0.2, 1.0], abs=1e-7)
