"""Estimate a checkpoint as it was before ``siam train``'s old end-of-epoch check touched its BatchNorm.

Until commit 3dd85fc the per-epoch check ran one train-mode forward of the smoothed base model over its
PGD-7-attacked check images (``test.subset(eval_attack_images, seed=2)``), which moved every BatchNorm
running statistic 10% (momentum 0.1) toward that batch's: ``R = 0.9 R0 + 0.1 B``. This script redoes
that pass (a fresh PGD-7 random start and noise draw) to get ``B'`` and writes ``R0' = (R - 0.1 B') / 0.9``.
``B'`` differs from the lost ``B`` only by those draws; ``--draws 2`` reports how far two draws disagree.

    python reports/bn-leak/undo_check_pass.py checkpoints/resnet20-pgd7 runs/resnet20-pgd7-unleaked
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import load_checkpoint, save_checkpoint
from models.smooth import Smooth
from training.attacks import pgd
from training.data import load_split, to_float


def batch_statistics(model: nn.Module, smooth_of: Smooth, x: torch.Tensor, y: torch.Tensor,
                     seed: int) -> dict[str, torch.Tensor]:
    """The running statistics one train-mode pass over PGD-7-attacked ``x`` folds in (momentum 1: B itself)."""
    torch.manual_seed(seed)
    model.eval()
    adv = pgd(smooth_of.forward_noisy, x, y)  # crafted in eval mode, as the old check did
    probe = copy.deepcopy(model)
    for m in probe.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.momentum = 1.0
    probe.train()
    with torch.no_grad():
        Smooth(probe, smooth_of.smoothing, smooth_of.num_classes).forward_noisy(adv)
    return {k: v.clone() for k, v in probe.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--draws", type=int, default=2, help="passes to average B' over (and compare)")
    args = p.parse_args()
    model, manifest = load_checkpoint(args.checkpoint)
    config = manifest.training["config"]
    smooth = Smooth(model, manifest.spec.smoothing, manifest.spec.architecture.num_classes)
    check = load_split(args.data, "test").subset(config["eval_attack_images"], seed=2)
    x, y = to_float(check.images), check.labels
    draws = [batch_statistics(model, smooth, x, y, seed) for seed in range(args.draws)]
    state = model.state_dict()
    spread = {}
    for key in draws[0]:
        b = torch.stack([d[key] for d in draws]).mean(0)
        spread[key] = float(((draws[0][key] - draws[-1][key]).abs() / (b.abs() + 1e-8)).median())
        state[key] = (state[key] - 0.1 * b) / 0.9
    model.load_state_dict(state)
    training = dict(manifest.training)
    training["bn_leak_undone"] = {"from": str(args.checkpoint), "weights_sha256": manifest.weights.sha256,
                                  "check_images": len(y), "draws": args.draws}
    save_checkpoint(args.output, model, manifest.spec, manifest.name + "-unleaked", training)
    worst = max(spread, key=spread.get)
    print(json.dumps({"output": str(args.output), "layers": len(spread) // 2,
                      "median relative gap between two draws of B', worst layer": [worst, round(spread[worst], 4)],
                      "same, median over layers": round(sorted(spread.values())[len(spread) // 2], 4)}, indent=1))


if __name__ == "__main__":
    main()
