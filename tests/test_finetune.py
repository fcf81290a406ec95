"""Training for the smoothed classifier: the SmoothAdv attack, fine-tuning from a checkpoint (--init), and
resuming a wide model, all on tiny data on the CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import Smooth, load_checkpoint
from tests.conftest import make_model
from tests.test_training import train_args
from training import train
from training.attacks import smoothed_log_probs


def test_smoothadv_attacks_the_smoothed_soft_classifier() -> None:
    """``--attack smoothadv`` runs PGD on the log mean softmax of --train-samples noisy copies: every
    gradient sees k copies of each image, the result stays in the eps ball, and it raises the smoothed
    classifier's loss (a stubbed attack, or one on a single copy, fails one of the three)."""
    model, spec = make_model(sigma=0.25)
    smooth = Smooth(model, spec.smoothing, 10, per_row_weight_noise=False)
    args = argparse.Namespace(attack="smoothadv", eps=8 / 255, step=2 / 255, steps=3)
    x = torch.rand(6, 3, 32, 32)
    y = torch.arange(6) % 10
    rows: list[int] = []
    soft = smoothed_log_probs(smooth, 4)

    def counted(images: torch.Tensor) -> torch.Tensor:
        rows.append(images.shape[0])
        return soft(images)

    torch.manual_seed(0)
    adv = train.craft(args, counted, x, y)
    assert set(rows) == {6} and len(rows) == 4  # 3 steps + the final pick of the best restart
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and not torch.equal(adv, x)
    big = smoothed_log_probs(smooth, 64)
    with torch.no_grad():
        torch.manual_seed(1)
        clean_loss = F.nll_loss(big(x), y)
        torch.manual_seed(1)
        adv_loss = F.nll_loss(big(adv), y)
    assert adv_loss > clean_loss


def test_smoothadv_training_records_its_settings(tiny_cifar_tar: Path, tmp_path: Path) -> None:
    out = tmp_path / "smoothadv"
    train.main(train_args(tiny_cifar_tar, out, tmp_path / "cache", "--epochs", "1", "--max-steps", "2",
                          "--attack", "smoothadv", "--train-samples", "3", "--steps", "1", "--sigma", "0.25"))
    config = load_checkpoint(out / "checkpoint")[1].training["config"]
    assert config["attack"] == "smoothadv" and config["train_samples"] == 3


def test_init_fine_tunes_from_a_checkpoint_and_names_it(tiny_cifar_tar: Path, tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    train.main(train_args(tiny_cifar_tar, parent, tmp_path / "cache", "--epochs", "1", "--max-steps", "1",
                          "--attack", "none", "--width", "2", "--val-images", "40", "--val-seed", "7"))
    parent_model, parent_manifest = load_checkpoint(parent / "checkpoint")
    child = tmp_path / "child"
    # lr 0: the child's weights must be exactly the parent's (only BatchNorm's running statistics move).
    train.main(train_args(tiny_cifar_tar, child, tmp_path / "cache", "--epochs", "1", "--max-steps", "1",
                          "--attack", "fgsm", "--sigma", "0.5", "--lr", "0", "--init", str(parent / "checkpoint")))
    model, manifest = load_checkpoint(child / "checkpoint")
    assert manifest.spec.architecture.width == 2 and manifest.spec.smoothing.sigma == 0.5
    record = manifest.training
    assert record["init"]["weights_sha256"] == parent_manifest.weights.sha256
    assert record["init"]["smoothing"]["sigma"] == parent_manifest.spec.smoothing.sigma
    # the parent's held-out images stay held out
    assert record["data"]["validation"] == parent_manifest.training["data"]["validation"]
    weights = {k: v for k, v in model.state_dict().items() if k.endswith("weight")}
    for k, v in weights.items():
        assert torch.equal(v, parent_model.state_dict()[k]), k


def test_init_refuses_a_contradicting_architecture(tiny_checkpoint: Path, tiny_cifar_tar: Path,
                                                   tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--width 4 contradicts --init"):
        train.main(train_args(tiny_cifar_tar, tmp_path / "x", tmp_path / "cache", "--max-steps", "1",
                              "--init", str(tiny_checkpoint), "--width", "4"))


def test_wide_model_resumes_and_refuses_changed_settings(tiny_cifar_tar: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "wide"
    common = train_args(tiny_cifar_tar, out, tmp_path / "cache", "--attack", "smoothadv", "--steps", "1",
                        "--train-samples", "1", "--width", "2", "--train-images", "100", "--batch-size", "50")
    train.main([*common, "--epochs", "1"])
    with pytest.raises(SystemExit, match=r"--sigma 0.0625 -> 0.25"):
        train.main([*common, "--epochs", "2", "--sigma", "0.25"])
    train.main([*common, "--epochs", "2"])
    assert "resuming" in capsys.readouterr().out
    model, manifest = load_checkpoint(out / "checkpoint")
    assert manifest.spec.architecture.width == 2
    assert model.state_dict()["net.conv1.weight"].shape[0] == 32  # 16 channels x 2
    assert [h["epoch"] for h in manifest.training["history"]] == [1, 2]
    assert manifest.training["history"][1]["steps"] == 4  # 2 steps an epoch, counted on across the resume


@pytest.mark.parametrize("attack", ["pgd", "fgsm", "smoothadv", "trades"])
def test_every_training_attack_moves_the_images_inside_the_ball_and_raises_the_loss(attack: str) -> None:
    """A stubbed training attack (``x_adv = x``) or one that leaves the eps ball fails here."""
    from tests.test_attacks import separable_problem

    model, x, y = separable_problem()
    smooth = Smooth(model, make_model()[1].smoothing.model_copy(update={"sigma": 0.01}), 10,
                    per_row_weight_noise=False)
    f = smoothed_log_probs(smooth, 2) if attack == "smoothadv" else smooth.forward_noisy
    args = argparse.Namespace(attack=attack, eps=8 / 255, step=2 / 255, steps=3)
    adv = train.craft(args, f, x, y)
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and (adv - x).abs().max() > 4 / 255
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y) + 0.5


def test_cli_says_what_path_is_wrong_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import siam_cli

    with pytest.raises(SystemExit) as done:
        siam_cli.main(["evaluate", str(tmp_path / "no-checkpoint")])
    assert done.value.code == 2 and "not a checkpoint folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        siam_cli.main(["train", "--quick", "--data", str(tmp_path / "no-data.tar.gz"), "--output", str(tmp_path)])
    assert done.value.code == 2 and "no such file or folder (--data takes" in capsys.readouterr().err
