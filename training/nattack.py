"""NAttack (Li, Li, Wang, Zhang & Gong, ICML 2019): a query-only black-box L-inf attack.

It never sees a gradient, so it cannot be fooled by gradient masking; that is why the report runs it.
The attack learns, per image, the mean ``mu`` of a Gaussian search distribution over a perturbation
in tanh space: a candidate is ``x_adv = x + clip(0.5 tanh(atanh(2x - 1) + mu + sigma * z) + 0.5 - x,
-eps, eps)``, always inside the eps ball and [0, 1]. Each iteration scores ``population`` candidates
by the margin ``log p_y - max_{j != y} log p_j`` of the black box's output probabilities and moves
``mu`` along the natural-evolution-strategies gradient estimate (standardised rewards). Every
``check_every`` iterations the projected mean is queried; the image is done once it is misclassified.
Defaults are the paper's CIFAR-10 settings (population 300, sigma 0.1, learning rate 0.02).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ProbabilityFn = Callable[[torch.Tensor], torch.Tensor]
"""A black box: images ``[K, 3, H, W]`` in [0, 1] -> class probabilities ``[K, C]``."""


@dataclass(frozen=True)
class NAttackResult:
    """Per image: the final adversarial image, whether the attack's own check saw a misclassification,
    and how many black-box queries it spent."""

    adversarial: torch.Tensor
    success: torch.Tensor
    queries: torch.Tensor


def to_tanh_space(x: torch.Tensor) -> torch.Tensor:
    """``atanh(2x - 1)``, clamped so that images at exactly 0 or 1 stay finite."""
    return torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))


def project(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The tanh-space point ``w`` mapped to pixels and clipped to the eps ball around ``x`` (stays in [0, 1])."""
    return x + (0.5 * torch.tanh(w) + 0.5 - x).clamp(-eps, eps)


def gap(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log p_y - max_{j != y} log p_j``: negative once the answer is wrong."""
    logp = probs.clamp_min(1e-30).log()
    true = logp.gather(1, y[:, None]).squeeze(1)
    other = logp.masked_fill(torch.nn.functional.one_hot(y, probs.shape[1]).bool(), -float("inf")).amax(1)
    return true - other


def margin(probs: torch.Tensor, y: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """The paper's loss ``gap + kappa`` clipped at 0 (the paper has kappa = 0): the attack pushes until
    another class beats the label by ``kappa`` in log-probability."""
    return (gap(probs, y) + kappa).clamp(0, 1000)


def nattack(black_box: ProbabilityFn, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255,
            population: int = 300, sigma: float = 0.1, lr: float = 0.02, max_queries: int = 150_000,
            check_every: int = 10, kappa: float = 0.0, generator: torch.Generator | None = None,
            progress: Callable[[int], None] | None = None) -> NAttackResult:
    """Untargeted NAttack on a batch of images, all queried together; each image spends at most
    ``max_queries`` queries, success checks included (one is kept for the final check).

    ``kappa`` > 0 asks for a confident mistake (another class ahead by kappa in log-probability) before an
    image counts as done: against a randomized classifier, an image left just across the boundary is
    often classified right again by the next noise draw. ``progress`` (if given) is called with the number
    of queries spent in each round, for a progress bar.
    """
    x, y = x.detach(), y.detach()
    batch = x.shape[0]
    base = to_tanh_space(x)
    mu = 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    adversarial = project(x, base + mu, eps)
    success = torch.zeros(batch, dtype=torch.bool, device=x.device)
    queries = torch.zeros(batch, dtype=torch.long, device=x.device)
    iteration = 0
    with torch.no_grad():
        while True:
            active = (~success & (queries + population < max_queries)).nonzero().squeeze(1)
            if iteration % check_every == 0 or not len(active):
                # Check the current mean of every still-running image (the paper checks before updating).
                check = (~success).nonzero().squeeze(1)
                if len(check):
                    adversarial[check] = project(x[check], base[check] + mu[check], eps)
                    wrong = gap(black_box(adversarial[check]), y[check]) < -kappa
                    queries[check] += 1
                    success[check[wrong]] = True
                    if progress:
                        progress(len(check))
                active = (~success & (queries + population < max_queries)).nonzero().squeeze(1)
            if not len(active):
                break
            z = torch.randn((len(active), population, *x.shape[1:]), generator=generator, device=x.device,
                            dtype=x.dtype)
            candidates = project(x[active, None], (base + mu)[active, None] + sigma * z, eps)
            probs = black_box(candidates.flatten(0, 1))
            loss = margin(probs, y[active].repeat_interleave(population), kappa).view(len(active), population)
            reward = -0.5 * loss
            advantage = (reward - reward.mean(1, keepdim=True)) / (reward.std(1, unbiased=False, keepdim=True) + 1e-7)
            step = torch.einsum("bp,bp...->b...", advantage, z)
            mu[active] += lr / (population * sigma) * step
            queries[active] += population
            iteration += 1
            if progress:
                progress(len(active) * population)
    return NAttackResult(adversarial, success, queries)
