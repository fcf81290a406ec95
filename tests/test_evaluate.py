"""What ``siam evaluate`` measures: each attack crafted with the settings it is given, each answer scored
against its own image's label, each sigma of ``--sigmas`` the one that answers.

The structural tests in test_training.py pass for an evaluation that scores ``!=`` for ``==``, ignores
``--sigmas`` or drops ``--eps``/``--steps``/``--eot`` (pgd's defaults are the evaluation's defaults), so
these compare against what is computed here independently."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from models import load_checkpoint
from tests.conftest import make_lively_model, saved_tiny
from training import evaluate
from training.compare import per_image_bits
from training.data import load_split, to_float

SETTINGS = {"eps": 1 / 255, "step": 0.5 / 255, "steps": 3, "restarts": 2, "eot": 3, "adaptive_samples": 5,
            "apgd_steps": 2, "apgd_eot": 2}  # none of them a default, so an attack that drops one is seen


class CountingModel(torch.nn.Module):
    """The base model, counting the rows (noisy copies) it is asked for."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.model(x, **kw)


def crafted(attack: str, run: Any = None, **changes: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images, their adversarial versions, rows the base model ran) for one attack of ``craft`` (or of
    ``run(smooth, x, y)``, on the same model, images and draws)."""
    from models.smooth import Smooth

    model, spec = make_lively_model()
    counting = CountingModel(model)
    smooth = Smooth(counting, spec.smoothing, 10)  # type: ignore[arg-type]
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(4)
    torch.manual_seed(0)
    adv = (run(smooth, x, y) if run is not None
           else evaluate.craft(attack, smooth, x, y, argparse.Namespace(**{**SETTINGS, **changes})))
    return x, adv, counting.rows


@pytest.mark.parametrize("attack", ["pgd", "eot", "adaptive", "adaptive-logits", "apgd-ce", "apgd-dlr"])
def test_each_attack_stays_in_the_eps_it_is_given_and_moves(attack: str) -> None:
    x, adv, _ = crafted(attack)
    moved = (adv - x).abs().amax()
    assert moved <= SETTINGS["eps"] + 1e-6  # at pgd's default of 8/255 the attack would go 8 times as far
    assert moved >= SETTINGS["eps"] / 2


@pytest.mark.parametrize(("attack", "per_image"), [
    ("pgd", 1), ("eot", SETTINGS["eot"]), ("adaptive", SETTINGS["adaptive_samples"]),
    ("adaptive-logits", SETTINGS["adaptive_samples"])])
def test_each_pgd_attack_runs_its_steps_restarts_and_draws(attack: str, per_image: int) -> None:
    """Rows the model ran: per restart, one gradient per step and the final loss, each over ``eot`` draws
    (the EOT attack) or ``adaptive_samples`` copies (the adaptive attacks' smoothed output)."""
    x, _, rows = crafted(attack)
    assert rows == SETTINGS["restarts"] * (SETTINGS["steps"] + 1) * per_image * len(x)


@pytest.mark.parametrize("attack", ["apgd-ce", "apgd-dlr"])
def test_apgd_runs_its_steps_and_draws(attack: str) -> None:
    """torchattacks' APGD runs ``eot`` draws for the first gradient and for each step."""
    for steps, eot in ((2, 2), (4, 3)):
        x, _, rows = crafted(attack, apgd_steps=steps, apgd_eot=eot)
        assert rows == len(x) * eot * (steps + 1), (steps, eot)


def test_apgd_attacks_run_the_loss_they_name() -> None:
    """apgd-dlr is APGD on the DLR loss, not a second APGD-CE: the same draws give the direct call's images."""
    from training.attacks import apgd

    for attack, loss, other in (("apgd-ce", "ce", "dlr"), ("apgd-dlr", "dlr", "ce")):
        _, adv, _ = crafted(attack)
        made = [crafted(attack, run=lambda smooth, x, y, loss=name: apgd(
            smooth.forward_noisy, smooth.model, x, y, loss=loss, eps=SETTINGS["eps"], steps=SETTINGS["apgd_steps"],
            eot=SETTINGS["apgd_eot"]))[1] for name in (loss, other)]
        assert torch.equal(adv, made[0]) and not torch.equal(adv, made[1]), attack


def test_craft_refuses_an_unknown_attack_and_returns_clean_images_as_they_are() -> None:
    x, adv, rows = crafted("clean")
    assert adv is x and rows == 0
    with pytest.raises(ValueError, match="unknown attack 'pgd2'"):
        crafted("pgd2")


def test_accuracy_is_each_image_scored_against_its_own_label(tiny_cifar_tar: Path, tmp_path: Path) -> None:
    """At sigma 0 the smoothed classifier is the base model's argmax, whatever m: the evaluation's per-image
    answers must be exactly those computed here on the same test subset, for clean images and, since its
    answers are then deterministic, two answers always agree. At the checkpoint's sigma (0.5) they do not:
    so ``--sigmas`` is the sigma that answered. The worst case is right exactly where every attack was."""
    checkpoint = saved_tiny(tmp_path / "lively", make_lively_model())
    out, cache = tmp_path / "eval", tmp_path / "cache"
    evaluate.main([str(checkpoint), "--data", str(tiny_cifar_tar), "--cache-dir", str(cache), "--images", "30",
                   "--samples", "1,4", "--sigmas", "0,0.5", "--attacks", "clean,pgd,eot", "--steps", "1",
                   "--eot", "2", "--eps", "0.002", "--threads", "1", "--output", str(out), "--seed", "5"])
    report = json.loads((out / "eval.json").read_text())
    rows = {(r["sigma"], r["attack"], r["samples"]): r for r in report["results"]}
    # The record says what ran: what `siam compare` checks before pairing two evaluations, and what a reader
    # of eval.json has to go on.
    assert report["attack"] == {"norm": "Linf", "eps": 0.002, "step": 2 / 255, "steps": 1, "restarts": 1,
                                "eot_draws": 2, "adaptive_samples": 8, "apgd_steps": 100, "apgd_eot": 20,
                                "attacks": ["clean", "pgd", "eot"]}
    assert report["certify"] == {"alpha": 0.001, "n0": "m", "n": "m", "radii": [0, 0.0625, 0.125, 0.25, 0.5],
                                 "space": "pixel"}
    assert report["data"]["subset_seed"] == 5 and report["data"]["images"] == 30
    assert report["aggregations"] == ["softmax"] and report["noise_layers"]["type"] == "none"

    model, _ = load_checkpoint(checkpoint)
    test = load_split(tiny_cifar_tar, "test", cache).subset(30, seed=5)
    with torch.no_grad():
        right = model(to_float(test.images)).argmax(1) == test.labels
    expected = per_image_bits(right)
    assert 0 < right.sum() < len(right)  # right and wrong answers both: a scoring that flips them shows
    for m in (1, 4):
        clean = rows[0.0, "clean", m]
        assert clean["per_image"] == expected, m
        assert clean["correct"] == int(right.sum()) and clean["accuracy"] == pytest.approx(right.float().mean())
        assert rows[0.0, "pgd", m]["agreement"] == 1.0 and clean["agreement"] == 1.0
        for sigma in (0.0, 0.5):
            pgd, eot = rows[sigma, "pgd", m]["per_image"], rows[sigma, "eot", m]["per_image"]
            both = "".join(str(int(a) & int(b)) for a, b in zip(pgd, eot, strict=True))
            assert rows[sigma, "worst", m]["per_image"] == both, (sigma, m)
    assert rows[0.5, "clean", 1]["agreement"] < 0.9  # the lively model's answers move with noise of 0.5
    moved = 0  # each gain is m = 4 paired with m = 1, image by image
    for g in report["gain_over_m1"]:
        at_4, at_1 = rows[g["sigma"], g["attack"], 4]["per_image"], rows[g["sigma"], g["attack"], 1]["per_image"]
        gained = sum(a == "1" and b == "0" for a, b in zip(at_4, at_1, strict=True))
        lost = sum(a == "0" and b == "1" for a, b in zip(at_4, at_1, strict=True))
        assert (g["samples"], g["aggregation"], g["gained"], g["lost"]) == (4, "softmax", gained, lost), g
        moved += gained + lost
    assert moved > 0 and len(report["gain_over_m1"]) == 2 * 4  # sigmas x (3 attacks + worst)
    assert {c["sigma"] for c in report["certified"]} == {0.0, 0.5}  # each sigma's certificates kept


def test_certified_accuracy_is_certify_at_the_sigma_and_alpha_given(tmp_path: Path, tiny_cifar_tar: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that answers "cat" whatever the noise: every cat is certified at m = 16 out to Cohen's radius
    sigma * Phi^-1(alpha^(1/16)), 0.337 at sigma 0.5 and alpha 0.01 (0.19 at the default alpha 0.001),
    nothing else is, and m = 4 abstains (alpha^(1/4) < 1/2). With one attack there is no worst case. Each
    m's latency is measured at that m (here read back as the m it was asked for)."""
    monkeypatch.setattr(evaluate, "latency_ms", lambda smooth, probe, m: float(m * len(probe)))
    model, spec = make_lively_model()
    with torch.no_grad():
        model.net.fc.weight.zero_()
        model.net.fc.bias.copy_(torch.nn.functional.one_hot(torch.tensor(3), 10) * 10.0)
    checkpoint = saved_tiny(tmp_path / "cat", (model, spec))
    out = tmp_path / "eval"
    evaluate.main([str(checkpoint), "--data", str(tiny_cifar_tar), "--cache-dir", str(tmp_path / "c"), "--images",
                   "30", "--samples", "4,16", "--attacks", "clean,pgd", "--steps", "1", "--alpha", "0.01",
                   "--radii", "0,0.25,0.5", "--threads", "1", "--output", str(out)])
    report = json.loads((out / "eval.json").read_text())
    test = load_split(tiny_cifar_tar, "test", tmp_path / "c").subset(30, seed=0)
    cats = int((test.labels == 3).sum())
    assert 0 < cats < 30
    certified = {(c["samples"], c["radius"]): c["correct"] for c in report["certified"]}
    assert certified == {(4, 0.0): 0, (4, 0.25): 0, (4, 0.5): 0, (16, 0.0): cats, (16, 0.25): cats, (16, 0.5): 0}
    assert {r["attack"] for r in report["results"]} == {"clean", "pgd"}
    assert report["latency_ms_one_image"] == {"4": 4.0, "16": 16.0}


def test_quick_preset_is_100_images_m_1_and_4_pgd_and_eot(tiny_checkpoint: Path, tiny_cifar_tar: Path,
                                                           tmp_path: Path) -> None:
    evaluate.main([str(tiny_checkpoint), "--quick", "--data", str(tiny_cifar_tar), "--cache-dir", str(tmp_path / "c"),
                   "--steps", "1", "--eot", "2", "--threads", "1", "--output", str(tmp_path / "q")])
    report = json.loads((tmp_path / "q" / "eval.json").read_text())
    assert report["data"]["images"] == 40  # all of the 40 test images, fewer than 100
    assert {(r["attack"], r["samples"]) for r in report["results"]} == {
        (a, m) for a in ("clean", "pgd", "eot", "worst") for m in (1, 4)}


def test_unknown_attacks_and_rules_are_refused_before_any_work(tiny_checkpoint: Path, tmp_path: Path) -> None:
    common = [str(tiny_checkpoint), "--data", str(tmp_path / "never-read"), "--output", str(tmp_path / "e")]
    with pytest.raises(SystemExit, match=r"unknown attacks \['pgd2'\]; choose from clean, pgd, eot"):
        evaluate.main([*common, "--attacks", "clean,pgd2"])
    with pytest.raises(SystemExit, match="--aggregations takes rules from vote, softmax, logits; got ','"):
        evaluate.main([*common, "--aggregations", ","])
