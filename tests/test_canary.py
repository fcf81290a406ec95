"""The canary set: written by training, read back by the service's loader."""

from __future__ import annotations

from pathlib import Path

import torch

from models.canary import load_canary
from training.canary import make_canary


def test_make_canary_round_trip(tiny_checkpoint: Path, tiny_cifar_folder: Path, tmp_path: Path) -> None:
    assert load_canary(tiny_checkpoint) is None
    make_canary(tiny_checkpoint, tiny_cifar_folder, count=6, cache_dir=tmp_path)
    canary = load_canary(tiny_checkpoint)
    assert canary is not None
    clean, attacked = canary.images["clean"], canary.images["pgd"]
    assert clean.shape == attacked.shape == (6, 3, 32, 32) and canary.labels.shape == (6,)
    assert (attacked - clean).abs().max() <= 8 / 255 + 1e-6 and not torch.equal(attacked, clean)
    assert attacked.min() >= 0 and attacked.max() <= 1
    assert "EOT-PGD" in canary.description["pgd"]
