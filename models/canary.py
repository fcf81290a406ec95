"""The canary set: a few labeled test images (clean, and attacked offline) stored beside a checkpoint.

Training writes it (``siam export --canary N``); the service reads it and re-scores it now and then,
so a drop in accuracy shows up on a dashboard without any labeled live traffic. Stored as safetensors
(no pickle) in ``<checkpoint>/canary.safetensors``; the attack used is described in its metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CANARY_FILE = "canary.safetensors"


@dataclass(frozen=True)
class Canary:
    labels: torch.Tensor  # [N] int64
    images: dict[str, torch.Tensor]  # set name ("clean", "pgd") -> [N, 3, H, W] float32 in [0, 1]
    description: dict[str, str]  # set name -> how it was made


def save_canary(folder: str | Path, canary: Canary) -> Path:
    path = Path(folder) / CANARY_FILE
    tensors = {"labels": canary.labels.cpu().contiguous()}
    tensors.update({f"images.{name}": x.float().cpu().contiguous() for name, x in canary.images.items()})
    save_file(tensors, str(path), metadata={"description": json.dumps(canary.description)})
    return path


def load_canary(folder: str | Path) -> Canary | None:
    """The canary stored beside a checkpoint, or None when there is none."""
    from safetensors import safe_open

    path = Path(folder) / CANARY_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        description = json.loads((f.metadata() or {}).get("description", "{}"))
    tensors = load_file(str(path))
    images = {k.removeprefix("images."): v for k, v in tensors.items() if k.startswith("images.")}
    return Canary(tensors["labels"], images, description)
