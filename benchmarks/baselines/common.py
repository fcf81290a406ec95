"""What both baselines share: loading the smoothed model and turning a base64 PNG into model input."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.checkpoint import load_checkpoint
from models.smooth import Prediction, Smooth


def load_smooth(checkpoint: Path, threads: int, device: str) -> Smooth:
    """The checkpoint as ``Smooth`` with its default chunking, as a user of ``models`` would write it."""
    torch.set_num_threads(threads)
    model, manifest = load_checkpoint(checkpoint, device)
    return Smooth(model, manifest.spec.smoothing, manifest.spec.architecture.num_classes)


def decode_png(text: str) -> torch.Tensor:
    """base64 PNG/JPEG to ``[3, H, W]`` floats in [0, 1]."""
    with Image.open(io.BytesIO(base64.b64decode(text))) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def to_json(p: Prediction) -> dict[str, object]:
    return {"label": p.label, "probabilities": p.probabilities, "vote_share": p.vote_share, "samples": p.samples}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
