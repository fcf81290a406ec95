"""Attacks: strength on a non-robust model, the eps ball and [0, 1] box, EOT, the adaptive attack."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import Smooth, SmoothingSpec
from models.resnet import Classifier, Normalize
from training.attacks import (
    EPS,
    STEP,
    STEPS,
    _loss_grad,
    cross_entropy,
    fgsm,
    pgd,
    smoothed_log_probs,
    smoothed_mean_logits,
    trades_kl,
    trades_pgd,
    undecided,
)


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


def test_adaptive_attack_on_the_mean_logits(problem: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    """The logits rule's smoothed output: the mean of the same copies' logits, and PGD on it breaks a model
    that is not robust, as the logits rule answers it."""
    model, x, y = problem
    smooth = Smooth(model, SmoothingSpec(sigma=0.1, aggregation="logits"), 10)
    torch.manual_seed(0)
    with torch.no_grad():
        mean = smoothed_mean_logits(smooth, 8)(x[:5])
    torch.manual_seed(0)
    with torch.no_grad():
        copies = smooth.forward_noisy(x[:5].repeat_interleave(8, dim=0)).view(5, 8, -1)
    assert torch.allclose(mean, copies.mean(1), atol=1e-6)
    adv = pgd(smoothed_mean_logits(smooth, 8), x, y)
    attacked = [p.label for p in smooth.predict_batch(adv, 16)]
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


# --- exact behaviour on a linear model, where every step can be computed by hand ------------------------


class BoxedLinear(nn.Module):
    """Logits ``[w . x, 0, -1]`` that refuse any input outside [0, 1] (an attack must clip before it
    queries the model) and record each batch size. For label 0 the cross-entropy's gradient is
    ``-(1 - p) w``: its sign is ``-sign(w)`` wherever ``w`` is not 0, and 0 where it is."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w, requires_grad=False)  # a parameter: torchattacks reads the device off it
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.min() >= 0 and x.max() <= 1, "an attack queried the model outside [0, 1]"
        self.batches.append(x.shape[0])
        score = (x * self.w).flatten(1).sum(1)
        return torch.stack([score, torch.zeros_like(score), -torch.ones_like(score)], 1)


def linear_case(n: int = 4, edge: bool = False) -> tuple[BoxedLinear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 8, 8, generator=g) * 0.01
    w[0] = 0.0  # the first channel does not reach the loss: its gradient is exactly 0
    x = 0.2 + 0.6 * torch.rand(n, 3, 8, 8, generator=g)
    if edge:  # pixels at 0 and 1, where a random start must be clipped before the model sees it
        x[:, 1, :4] = 0.0
        x[:, 1, 4:] = 1.0
    return BoxedLinear(w), x, torch.zeros(n, dtype=torch.long)


def test_fgsm_is_one_signed_step_of_eps() -> None:
    f, x, y = linear_case()
    adv = fgsm(f, x, y)
    expected = x - EPS * f.w.sign()
    assert torch.allclose(adv, expected, atol=1e-7)  # zero gradient: the pixel does not move
    assert f.batches == [4]  # one forward of the batch, no EOT copies
    half = fgsm(f, x, y, step=EPS / 2)
    assert torch.allclose(half, x - EPS / 2 * f.w.sign(), atol=1e-7)


def test_fast_fgsm_starts_uniformly_in_the_ball_and_steps_one_and_a_quarter_eps() -> None:
    """Wong et al.'s FGSM-RS: start x + U(-eps, eps), step 1.25 eps, project. Where the step is -eps'
    sign, the final offset is max(u - 1.25 eps, -eps): pinned at -eps with probability 5/8, and
    uniform on [-eps, -eps/4] otherwise."""
    torch.manual_seed(0)
    f, x, y = linear_case(n=64, edge=True)
    adv = fgsm(f, x, y, random_start=True)
    moving = (f.w < 0).expand_as(x) & (x > 0.1) & (x < 0.9)
    offset = (adv - x)[moving] / EPS
    assert offset.min() >= 0.25 - 1e-5 and offset.max() <= 1 + 1e-5
    assert abs(float((offset > 1 - 1e-5).float().mean()) - 5 / 8) < 0.03
    assert float(offset[offset < 1 - 1e-5].std()) > 0.15  # a spread, not one fixed step
    frozen = (adv - x)[:, 0]  # zero gradient: only the random start moved these
    assert frozen.abs().max() <= EPS + 1e-6 and float(frozen.std()) > 0.5 * EPS / 3**0.5


def test_pgd_starts_uniformly_in_the_ball_clipped_to_the_box() -> None:
    torch.manual_seed(0)
    f, x, y = linear_case(n=64, edge=True)
    start = pgd(f, x, y, steps=0)  # no step: the random start itself (default random_start=True)
    offset = (start - x)[:, 0] / EPS  # away from the box's edges
    assert offset.abs().max() <= 1 + 1e-6 and abs(float(offset.mean())) < 0.02
    assert abs(float(offset.std()) - 1 / 3**0.5) < 0.02  # U(-1, 1) has standard deviation 1/sqrt(3)
    assert start.min() >= 0 and start.max() <= 1
    assert set(f.batches) == {64}  # eot=1 by default


def test_pgd_moves_only_pixels_that_reach_the_loss_without_random_start() -> None:
    f, x, y = linear_case()
    adv = pgd(f, x, y, steps=7, random_start=False)
    assert torch.equal(adv[:, 0], x[:, 0])
    assert torch.allclose(adv[:, 1:], (x - EPS * f.w.sign())[:, 1:], atol=1e-6)  # 7 steps of 2/255, projected


@pytest.mark.parametrize("eot", [1, 2])
def test_pgd_keeps_each_images_restart_with_the_highest_loss_it_was_given(eot: int) -> None:
    """Restarts are judged per image by the attack's own loss (here minus the cross-entropy, which no
    restart of a plain attack would favour), averaged over the EOT draws."""
    f, x, y = linear_case(n=6)

    def closest(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return -cross_entropy(logits, labels)

    torch.manual_seed(3)
    got = pgd(f, x, y, steps=0, restarts=5, eot=eot, loss=closest)
    torch.manual_seed(3)
    starts = torch.stack([(x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1) for _ in range(5)])
    with torch.no_grad():
        losses = torch.stack([closest(f(s), y) for s in starts])  # [restart, image]
    want = starts[losses.argmax(0), torch.arange(6)]
    assert torch.equal(got, want)


def test_undecided_needs_only_the_top_two_classes() -> None:
    logits = torch.tensor([[2.0, 5.0], [1.0, 1.0], [0.5, -3.0]])
    assert torch.allclose(undecided(logits, torch.zeros(3, dtype=torch.long)), torch.tensor([-3.0, 0.0, -3.5]))


def test_apgd_runs_autoattacks_protocol_and_queries_only_inside_the_ball(monkeypatch: pytest.MonkeyPatch,
                                                                          ) -> None:
    """The defaults are AutoAttack's protocol for randomized defenses (100 steps, EOT 20); the attack is
    torchattacks' own, told the norm, eps and loss; and every point it queries lies in the eps ball."""
    import inspect

    import torchattacks

    from training.attacks import apgd

    f, x, y = linear_case()
    calls: list[int] = []

    def counted(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return f(batch)

    apgd(counted, f, x, y)
    assert len(calls) == (100 + 1) * 20  # each of 100 steps and the start, on 20 draws
    assert inspect.signature(apgd).parameters["loss"].default == "ce"
    made: list[dict] = []
    real = torchattacks.APGD

    def spy(*args: object, **kwargs: object) -> object:
        made.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torchattacks, "APGD", spy)
    eps = 3 / 255
    seen: list[float] = []

    def queried(batch: torch.Tensor) -> torch.Tensor:
        seen.append(float((batch.detach() - x.repeat(batch.shape[0] // x.shape[0], 1, 1, 1)).abs().max()))
        return f(batch)

    apgd(queried, f, x, y, loss="dlr", eps=eps, steps=3, eot=1)
    assert made == [{"norm": "Linf", "eps": eps, "steps": 3, "loss": "dlr", "eot_iter": 1}]
    assert max(seen) <= eps + 1e-6


def test_apgd_says_how_to_install_torchattacks(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from training.attacks import apgd

    monkeypatch.setitem(sys.modules, "torchattacks", None)
    f, x, y = linear_case()
    with pytest.raises(RuntimeError, match=r"pip install --no-deps torchattacks==3\.5\.1"):
        apgd(f, f, x, y)


def test_trades_pgd_moves_the_output_distribution_and_stays_in_the_ball(
        problem: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    """TRADES's attack needs no label: it must raise KL(f(x) || f(x')) well above its tiny start, and
    never leave the eps ball or the image box."""
    model, x, y = problem
    torch.manual_seed(0)
    start = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    adv = trades_pgd(model, x, eps=EPS, step=STEP, steps=STEPS)
    with torch.no_grad():
        clean = model(x)
        assert trades_kl(clean, model(adv)).mean() > 10 * trades_kl(clean, model(start)).mean() + 1e-3
    assert (adv - x).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    # it maximises the change of the whole distribution, not the true class's loss: many answers, not all, flip
    assert accuracy(model, x, y) > 0.95 and accuracy(model, adv, y) < 0.8


def test_trades_pgd_starts_from_the_reference_codes_tiny_gaussian_inside_the_image_box() -> None:
    """TRADES's reference code starts its attack at x + 0.001 * N(0, I), clipped to [0, 1]: a start that
    only breaks the tie of KL(x || x) = 0, not a random point of the eps ball. With no steps the start is
    what comes back."""
    model = Classifier(Normalize((0, 0, 0), (1, 1, 1)), nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))).eval()
    x = torch.rand(64, 3, 8, 8) * 0.98 + 0.01  # away from the box's edges
    start = trades_pgd(model, x, steps=0)
    moved = start - x
    assert abs(moved.std().item() - 0.001) < 1e-4 and abs(moved.mean().item()) < 1e-4
    edges = torch.cat([torch.zeros(8, 3, 8, 8), torch.ones(8, 3, 8, 8)])
    at_edges = trades_pgd(model, edges, steps=0)
    assert at_edges.min() >= 0 and at_edges.max() <= 1
    assert (at_edges != edges).float().mean() > 0.4  # half of each side moves inward, none outward


def test_trades_kl_is_zero_for_equal_outputs_and_positive_otherwise() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    assert torch.allclose(trades_kl(logits, logits), torch.zeros(2), atol=1e-6)
    shifted = logits + torch.tensor([[0.0, 3.0, 0.0], [1.0, 0.0, 0.0]])
    kl = trades_kl(logits, shifted)
    assert (kl > 0.05).all()
    p, q = logits.softmax(1), shifted.softmax(1)
    assert torch.allclose(kl, (p * (p / q).log()).sum(1), atol=1e-5)  # KL(p_clean || p_other), not reversed
