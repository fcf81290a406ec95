"""Make the canary set the service re-scores in the background (``siam export --canary N``).

``N`` test images chosen with a fixed seed, stored clean and attacked with EOT-PGD (L-inf, eps 8/255,
7 steps of 2/255, gradient averaged over 8 noise draws) against the checkpoint itself, so the service
can watch both clean and robust accuracy without labeled live traffic.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.canary import Canary, save_canary
from models.checkpoint import load_checkpoint
from models.smooth import Smooth
from training.attacks import EPS, STEP, STEPS, pgd
from training.data import load_split, to_float

EOT_DRAWS = 8


def make_canary(checkpoint: str | Path, data: str | Path, count: int, seed: int = 0,
                cache_dir: str | Path | None = "data-cache") -> Path:
    """Write ``<checkpoint>/canary.safetensors``; returns its path."""
    model, manifest = load_checkpoint(checkpoint, "cpu")
    smooth = Smooth(model, manifest.spec.smoothing, manifest.spec.architecture.num_classes)
    test = load_split(data, "test", cache_dir).subset(count, seed)
    images, labels = to_float(test.images), test.labels
    torch.manual_seed(seed)
    adversarial = pgd(smooth.forward_noisy, images, labels, eps=EPS, step=STEP, steps=STEPS, eot=EOT_DRAWS)
    how = f"{count} test images of {test.source} (subset seed {seed}, sha256 {test.checksum[:16]})"
    return save_canary(checkpoint, Canary(labels, {"clean": images, "pgd": adversarial}, {
        "clean": how,
        "pgd": f"{how}, EOT-PGD L-inf eps {EPS * 255:g}/255, {STEPS} steps of {STEP * 255:g}/255, "
               f"{EOT_DRAWS} noise draws per gradient, against this checkpoint",
    }))
