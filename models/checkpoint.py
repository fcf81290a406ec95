"""The checkpoint format: a folder with ``weights.safetensors`` and ``manifest.json``.

The manifest holds the :class:`~models.spec.ModelSpec` (architecture, classes, normalization,
smoothing, noise layers), the training record, and the SHA-256 of the weights file. Weights are read
with safetensors only, so no pickle is ever loaded. Every way a checkpoint can be wrong raises
:class:`CheckpointError` with a message that names the problem.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.resnet import Classifier, build_classifier
from models.spec import ModelSpec

FORMAT = "siam-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the reason in the message."""


class WeightsEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = WEIGHTS_FILE
    sha256: str
    bytes: int


class Manifest(BaseModel):
    """``manifest.json``: what the weights are and how the smoothed model must use them."""

    model_config = ConfigDict(extra="forbid")
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    name: str
    spec: ModelSpec
    weights: WeightsEntry
    training: dict[str, Any] = Field(default_factory=dict)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(folder: str | Path, model: Classifier, spec: ModelSpec, name: str,
                    training: dict[str, Any] | None = None) -> Manifest:
    """Write ``model``'s weights and manifest into ``folder`` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights_path = folder / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path), metadata={"format": FORMAT})
    manifest = Manifest(
        name=name, spec=spec, training=training or {},
        weights=WeightsEntry(sha256=sha256_file(weights_path), bytes=weights_path.stat().st_size),
    )
    (folder / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def read_manifest(folder: str | Path) -> Manifest:
    """Parse and validate ``manifest.json`` without touching the weights."""
    path = Path(folder) / MANIFEST_FILE
    if not Path(folder).is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected {MANIFEST_FILE} and {WEIGHTS_FILE})")
    if not path.is_file():
        raise CheckpointError(f"{path}: manifest is missing")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: manifest is not valid JSON ({e})") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {raw.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise CheckpointError(f"{path}: invalid manifest ({problems})") from e


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, Manifest]:
    """Verify and load a checkpoint; the model is returned in eval mode on ``device``."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    weights_path = folder / manifest.weights.file
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: weights file is missing")
    size = weights_path.stat().st_size
    if size != manifest.weights.bytes:
        raise CheckpointError(
            f"{weights_path}: weights file is {size} bytes, manifest says {manifest.weights.bytes} (truncated?)")
    digest = sha256_file(weights_path)
    if digest != manifest.weights.sha256:
        raise CheckpointError(
            f"{weights_path}: checksum mismatch (sha256 {digest}, manifest says {manifest.weights.sha256})")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({e})") from e
    model = build_classifier(manifest.spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{weights_path}: weights do not match architecture {manifest.spec.architecture.name} "
            f"(width {manifest.spec.architecture.width}): {e}") from e
    return model.to(device).eval(), manifest
