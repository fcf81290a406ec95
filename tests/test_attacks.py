"""Attacks: strength on a non-robust model, the eps ball and [0, 1] box, EOT, the adaptive attack."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import Smooth, SmoothingSpec
from models.resnet import Classifier, Normalize
from training.attacks import EPS, _loss_grad, fgsm, pgd, smoothed_log_probs, undecided


def separable_problem(n: int = 200, seed: int = 0) -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    """Two classes that differ by +-0.02 along a fixed sign pattern (less than eps = 8/255), and a
    plain linear classifier trained on them to ~100% clean accuracy: non-robust by construction."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, 2, (3, 32, 32), generator=g).float() * 2 - 1
    y = torch.arange(n) % 2
    x = (0.5 + 0.02 * (2 * y - 1).float().view(-1, 1, 1, 1) * pattern
         + 0.05 * (torch.rand(n, 3, 32, 32, generator=g) - 0.5)).clamp(0, 1)
    torch.manual_seed(seed)
    model = Classifier(Normalize((0.5,) * 3, (0.25,) * 3), nn.Sequential(nn.Flatten(), nn.Linear(3072, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def accuracy(f: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((f(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def problem() -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    return separable_problem()


def test_pgd_drives_a_non_robust_model_to_zero(problem: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = problem
    assert accuracy(model, x, y) > 0.97
    adv = pgd(model, x, y)  # paper defaults: eps 8/255, 7 steps of 2/255, random start
    assert accuracy(model, adv, y) < 0.03
    assert accuracy(model, fgsm(model, x, y), y) < 0.2


@pytest.mark.parametrize("eps", [2 / 255, EPS, 0.3])
def test_attacks_stay_in_the_eps_ball_and_the_image_box(
        problem: tuple[Classifier, torch.Tensor, torch.Tensor], eps: float) -> None:
    model, x, y = problem
    x = x.clone()
    x[:10] = 0.0  # images at the edges of [0, 1], where clipping matters
    x[10:20] = 1.0
    for adv in (pgd(model, x, y, eps=eps, step=eps / 2, steps=5, restarts=2),
                fgsm(model, x, y, eps=eps), fgsm(model, x, y, eps=eps, random_start=True)):
        assert (adv - x).abs().max() <= eps + 1e-6
        assert adv.min() >= 0.0 and adv.max() <= 1.0


def test_weaker_eps_is_weaker(problem: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = problem
    accs = [accuracy(model, pgd(model, x, y, eps=e, step=e / 4, steps=10), y) for e in (0.0, 0.005, 0.04)]
    assert accs[0] > 0.97 and accs[0] >= accs[1] >= accs[2] and accs[2] < 0.03


def test_eot_averages_gradients_over_noise_draws(problem: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = problem
    x, y = x[:4], y[:4]
    deterministic = [_loss_grad(model, x, y, eot) for eot in (1, 4)]
    assert torch.allclose(deterministic[0], deterministic[1], atol=1e-6)
    noisy = Smooth(model, SmoothingSpec(sigma=0.5), 10).forward_noisy
    spread = {k: torch.stack([_loss_grad(noisy, x, y, k) for _ in range(8)]).var(0).mean().item() for k in (1, 16)}
    assert spread[16] < spread[1] / 4  # averaging 16 draws cuts the gradient's variance ~16x


def test_adaptive_attack_on_the_smoothed_output(problem: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = problem
    smooth = Smooth(model, SmoothingSpec(sigma=0.1), 10)
    f = smoothed_log_probs(smooth, 8)
    with torch.no_grad():
        probs = f(x[:5]).exp()
    assert probs.shape == (5, 10) and torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
    clean = [p.label for p in smooth.predict_batch(x, 16)]
    adv = pgd(f, x, y)
    attacked = [p.label for p in smooth.predict_batch(adv, 16)]
    assert sum(int(a == b) for a, b in zip(clean, y.tolist(), strict=True)) > 0.95 * len(y)
    assert sum(int(a == b) for a, b in zip(attacked, y.tolist(), strict=True)) < 0.05 * len(y)


def test_apgd_ce_and_dlr_break_a_non_robust_model_inside_the_eps_ball(
        problem: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    from training.attacks import apgd

    model, x, y = problem
    for loss in ("ce", "dlr"):
        adv = apgd(model, model, x[:60], y[:60], loss=loss, steps=10, eot=1)
        assert (adv - x[:60]).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        assert accuracy(model, adv, y[:60]) < 0.1, loss


def test_apgd_averages_gradients_over_eot_draws(problem: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    """With eot = k, APGD sees k independent forward passes per step, not one (a planted bug that ignores
    ``eot`` would call the model ``steps`` times)."""
    from training.attacks import apgd

    model, x, y = problem
    calls = []

    def f(rows: torch.Tensor) -> torch.Tensor:
        calls.append(rows.shape[0])
        return model(rows)

    apgd(f, model, x[:8], y[:8], steps=5, eot=1)
    assert len(calls) == 6  # the starting point's gradient, then one per step
    calls.clear()
    apgd(f, model, x[:8], y[:8], steps=5, eot=3)
    assert len(calls) == 18 and set(calls) == {8}


def test_pgd_eot_averages_each_step_over_that_many_draws(
        problem: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    """``pgd(eot=k)`` runs every gradient (and the final pick) on k copies of each image, as one batch."""
    model, x, y = problem
    rows: list[int] = []

    def f(batch: torch.Tensor) -> torch.Tensor:
        rows.append(batch.shape[0])
        return model(batch)

    pgd(f, x[:5], y[:5], steps=4, eot=6)
    assert rows == [30] * 5  # 4 steps + the restart's final loss, each on 6 draws of the 5 images


def test_smoothed_probabilities_is_the_served_aggregate_without_gradients() -> None:
    from training.attacks import smoothed_probabilities

    model = Classifier(Normalize((0, 0, 0), (1, 1, 1)), nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))).eval()
    smooth = Smooth(model, SmoothingSpec(sigma=0.25, aggregation="softmax"), 4)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)  # 2 images: not the 3 channels
    torch.manual_seed(0)
    scores = smoothed_probabilities(smooth, 32)(x)
    assert scores.shape == (2, 4) and not scores.requires_grad
    torch.manual_seed(0)
    logits = smooth.noisy_logits(x.detach(), [32] * 2)
    expected = logits.softmax(1).view(2, 32, 4).mean(1)  # image by image, 32 consecutive copies each
    assert torch.allclose(scores, expected, atol=1e-6)
    votes = smoothed_probabilities(smooth, 32, "vote")(x)
    assert torch.allclose(votes.sum(1), torch.ones(2)) and ((votes * 32) - (votes * 32).round()).abs().max() < 1e-4


def test_pgd_at_the_stopping_rule_levels_the_top_two_classes(problem: tuple[Classifier, torch.Tensor, torch.Tensor],
                                                             ) -> None:
    """``loss=undecided`` aims at how close the vote is, not at the label: on a model that is confident on
    every clean image, the attacked images' top-two gap shrinks toward zero (to within the fixed step's
    overshoot), which a random perturbation of the same size does not do."""
    model, x, y = problem

    def gap(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            top = model(images).log_softmax(1).topk(2, dim=1).values
        return top[:, 0] - top[:, 1]

    stalled = pgd(model, x, y, loss=undecided, steps=80, step=EPS / 32)
    shaken = (x + EPS * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2 - EPS).clamp(0, 1)
    assert (stalled - x).abs().max() <= EPS + 1e-6 and stalled.min() >= 0 and stalled.max() <= 1
    clean, level, random = gap(x).median(), gap(stalled).median(), gap(shaken).median()
    assert level < 0.1 * clean, (clean, level)
    assert random > 0.5 * clean, (clean, random)
