"""Checkpoint round trip and every way a checkpoint can be broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from models.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, sha256_file
from tests.conftest import make_model


def test_round_trip_keeps_weights_and_settings(tmp_path: Path) -> None:
    model, spec = make_model(pni="channel", sigma=0.12, samples=32, aggregation="vote", space="normalized")
    save_checkpoint(tmp_path / "ck", model, spec, name="pni", training={"epochs": 3, "data": {"sha256": "abc"}})
    loaded, manifest = load_checkpoint(tmp_path / "ck")
    assert manifest.spec == spec and manifest.name == "pni" and manifest.training["epochs"] == 3
    assert manifest.spec.smoothing.sigma == 0.12 and manifest.spec.smoothing.space == "normalized"
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert not loaded.training


def _rewrite_manifest(folder: Path, **changes: object) -> None:
    data = json.loads((folder / MANIFEST_FILE).read_text())
    for dotted, value in changes.items():
        node = data
        *path, last = dotted.split("__")
        for key in path:
            node = node[key]
        node[last] = value
    (folder / MANIFEST_FILE).write_text(json.dumps(data))


def test_missing_folder_and_files(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path / "nope")
    (tiny_checkpoint / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="weights file is missing"):
        load_checkpoint(tiny_checkpoint)
    (tiny_checkpoint / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="manifest is missing"):
        load_checkpoint(tiny_checkpoint)


def test_manifest_not_json_or_not_ours(tiny_checkpoint: Path) -> None:
    (tiny_checkpoint / MANIFEST_FILE).write_text('{"format": "siam-checkpoint", ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_manifest(tiny_checkpoint)
    (tiny_checkpoint / MANIFEST_FILE).write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a siam-checkpoint manifest"):
        read_manifest(tiny_checkpoint)


def test_unsupported_version_and_unknown_architecture(tiny_checkpoint: Path) -> None:
    _rewrite_manifest(tiny_checkpoint, spec__architecture__name="resnet1001")
    with pytest.raises(CheckpointError, match=r"spec\.architecture\.name"):
        load_checkpoint(tiny_checkpoint)
    _rewrite_manifest(tiny_checkpoint, format_version=99)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tiny_checkpoint)


def test_checksum_mismatch(tiny_checkpoint: Path) -> None:
    weights = tiny_checkpoint / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # same size, one byte of a weight changed
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(tiny_checkpoint)


def test_truncated_weights(tiny_checkpoint: Path) -> None:
    weights = tiny_checkpoint / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    # the size check's own words (the test's tmp folder is named after the test, "truncated" included)
    with pytest.raises(CheckpointError, match=r"weights file is 1000 bytes, manifest says \d+ \(truncated\?\)"):
        load_checkpoint(tiny_checkpoint)


def test_corrupt_safetensors_with_a_matching_checksum(tiny_checkpoint: Path) -> None:
    """A file that is not safetensors at all, even if the manifest vouches for it, is refused."""
    weights = tiny_checkpoint / WEIGHTS_FILE
    weights.write_bytes(b"\xff" * 64)
    _rewrite_manifest(tiny_checkpoint, weights__sha256=sha256_file(weights), weights__bytes=64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tiny_checkpoint)


def test_weights_of_another_architecture(tiny_checkpoint: Path) -> None:
    _rewrite_manifest(tiny_checkpoint, spec__architecture__width=2)
    with pytest.raises(CheckpointError, match="do not match architecture resnet20"):
        load_checkpoint(tiny_checkpoint)


def test_class_names_must_match_classes(tiny_checkpoint: Path) -> None:
    _rewrite_manifest(tiny_checkpoint, spec__class_names=["cat", "dog"])
    with pytest.raises(CheckpointError, match="2 class names for 10 classes"):
        load_checkpoint(tiny_checkpoint)


def test_saving_makes_nested_folders_overwrites_and_labels_the_weights(tmp_path: Path) -> None:
    from safetensors import safe_open

    model, spec = make_model()
    folder = tmp_path / "runs" / "a" / "final"  # parents created
    save_checkpoint(folder, model, spec, "tiny")
    manifest = save_checkpoint(folder, model, spec, "tiny", training={"epochs": 2})  # saving again is fine
    assert read_manifest(folder).training == {"epochs": 2} == manifest.training
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
        assert f.metadata() == {"format": "siam-checkpoint"}  # says what it is to any safetensors reader
    text = (folder / MANIFEST_FILE).read_text()
    assert text.startswith('{\n  "format": "siam-checkpoint"') and text.endswith("}\n")  # reviewable in a diff


def test_weights_missing_a_tensor_are_refused(tiny_checkpoint: Path) -> None:
    """Every parameter must come from the file (strict loading): a state dict short of one tensor, under a
    manifest whose checksum matches it, is refused rather than served with that tensor's initial values."""
    from safetensors.torch import load_file, save_file

    weights = tiny_checkpoint / WEIGHTS_FILE
    state = load_file(str(weights))
    state.pop(sorted(state)[0])
    save_file(state, str(weights), metadata={"format": "siam-checkpoint"})
    _rewrite_manifest(tiny_checkpoint, weights__sha256=sha256_file(weights), weights__bytes=weights.stat().st_size)
    with pytest.raises(CheckpointError, match="Missing key"):
        load_checkpoint(tiny_checkpoint)
