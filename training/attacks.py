"""White-box L-inf attacks: FGSM, PGD with random start and restarts, EOT-PGD, the adaptive attack on
the smoothed classifier's soft output (Salman et al., 2019), and TRADES's label-free KL attack (training).

Every attack takes a *logit function* ``f(x) -> [B, C]`` (log-probabilities work too) and images in
[0, 1]; it never leaves the eps ball or [0, 1]. A randomized model (input noise, PNI weight noise)
is attacked honestly by averaging the gradient over ``eot`` noise draws, and the smoothed classifier
itself by :func:`smoothed_log_probs`, the log of its mean softmax over m copies. Query-only attacks
(NAttack, :mod:`training.nattack`) see nothing but :func:`smoothed_probabilities`, what the service returns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.smooth import Smooth, aggregate
from models.spec import Aggregation

LogitFn = Callable[[torch.Tensor], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits [B, C], labels [B]) -> per-image [B]

EPS = 8 / 255
STEP = 2 / 255
STEPS = 7


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The usual attack loss: high when the true class loses."""
    return F.cross_entropy(logits, y, reduction="none")


def undecided(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Minus the gap between the two highest scores, whatever the label: high when the top two classes
    are level. Maximised, it aims at sequential sampling's stopping rule (a close vote never stops, so
    every copy of the budget is spent) rather than at the answer."""
    top = logits.topk(2, dim=1).values
    return top[:, 1] - top[:, 0]


def _losses(f: LogitFn, x: torch.Tensor, y: torch.Tensor, eot: int, loss: Loss = cross_entropy) -> torch.Tensor:
    """Per-image loss averaged over ``eot`` draws, run as one batch (x repeated), so a randomized ``f``
    sees independent noise per draw."""
    logits = f(x.repeat(eot, 1, 1, 1))
    return loss(logits.float(), y.repeat(eot)).view(eot, -1).mean(0)


def _loss_grad(f: LogitFn, x: torch.Tensor, y: torch.Tensor, eot: int, loss: Loss = cross_entropy) -> torch.Tensor:
    """Gradient of the (EOT-averaged) loss w.r.t. a fresh leaf copy of ``x``: reset every step."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(_losses(f, x, y, eot, loss).sum(), x)
    return grad


def project_linf(adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``adv`` clipped to the L-inf ball of radius ``eps`` around ``x`` and to the image box [0, 1]."""
    return torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)


def fgsm(f: LogitFn, x: torch.Tensor, y: torch.Tensor, eps: float = EPS,
         random_start: bool = False, step: float | None = None) -> torch.Tensor:
    """FGSM; with ``random_start`` it is Wong et al.'s "fast" variant (uniform start, step 1.25 eps)."""
    delta = torch.empty_like(x).uniform_(-eps, eps) if random_start else torch.zeros_like(x)
    start = (x + delta).clamp(0, 1)
    grad = _loss_grad(f, start, y, 1)
    step = step if step is not None else (1.25 * eps if random_start else eps)
    adv = start + step * grad.sign()
    return project_linf(adv, x, eps).detach()


def pgd(f: LogitFn, x: torch.Tensor, y: torch.Tensor, eps: float = EPS, step: float = STEP,
        steps: int = STEPS, restarts: int = 1, random_start: bool = True, eot: int = 1,
        loss: Loss = cross_entropy) -> torch.Tensor:
    """PGD L-inf (Madry et al.) maximising ``loss`` (cross-entropy unless told); keeps, per image, the
    restart with the highest final loss. ``eot`` > 1 averages each step's gradient over that many draws."""
    x = x.detach()
    best = x.clone()
    best_loss = torch.full((x.shape[0],), -float("inf"), device=x.device)
    for _ in range(restarts):
        adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1) if random_start else x.clone()
        for _ in range(steps):
            grad = _loss_grad(f, adv, y, eot, loss)
            adv = adv + step * grad.sign()
            adv = project_linf(adv, x, eps).detach()
        with torch.no_grad():
            final = _losses(f, adv, y, eot, loss)
        better = final > best_loss
        best[better] = adv[better]
        best_loss = torch.where(better, final, best_loss)
    return best


def trades_kl(clean_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """Per-image KL(p_clean || p_other) of the two softmaxes: TRADES's robustness term (Zhang et al.,
    2019), which pushes the whole output distribution, not only the true class's score, to stay put."""
    return F.kl_div(other_logits.float().log_softmax(1), clean_logits.float().log_softmax(1),
                    reduction="none", log_target=True).sum(1)


def trades_pgd(f: LogitFn, x: torch.Tensor, eps: float = EPS, step: float = STEP, steps: int = STEPS,
               start_std: float = 0.001) -> torch.Tensor:
    """TRADES's inner maximisation: PGD L-inf on KL(f(x) || f(x')) from a small Gaussian start, as in
    the TRADES reference code. It needs no label, so it moves the point where the model's answer moves
    most, whichever class that favours."""
    x = x.detach()
    with torch.no_grad():
        target = f(x).float()
    adv = (x + start_std * torch.randn_like(x)).clamp(0, 1)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(trades_kl(target, f(adv)).sum(), adv)
        adv = adv + step * grad.sign()
        adv = project_linf(adv, x, eps)
    return adv.detach()


class _LogitModule(nn.Module):
    """A logit function as the ``nn.Module`` torchattacks expects (it reads the device off ``model``)."""

    def __init__(self, f: LogitFn, model: nn.Module):
        super().__init__()
        self.f, self.model = f, model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x).float()


def apgd(f: LogitFn, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "ce", eps: float = EPS,
         steps: int = 100, eot: int = 20) -> torch.Tensor:
    """APGD (Croce & Hein, 2020; AutoAttack's protocol for randomized defenses: APGD-CE and APGD-DLR,
    100 steps, EOT over 20 draws), as torchattacks implements it, against the logit function ``f`` of
    ``model``. Returns the iterate with the highest loss APGD saw for each image, not only the images
    one noisy draw happened to misclassify (which is all ``torchattacks.APGD.__call__`` returns), so the
    smoothed classifier is judged on APGD's best point."""
    try:
        import torchattacks
    except ImportError as e:  # metadata pins an old requests it never imports: install without deps
        raise RuntimeError("APGD needs torchattacks: pip install --no-deps torchattacks==3.5.1") from e
    attack = torchattacks.APGD(_LogitModule(f, model), norm="Linf", eps=eps, steps=steps, loss=loss, eot_iter=eot)
    with torch.enable_grad():
        x_best = attack.attack_single_run(x.detach(), y)[0]
    return project_linf(x_best.detach(), x, eps)


def noisy_logits_fn(smooth: Smooth) -> LogitFn:
    """The base model under one fresh draw of the smoothing noise per row (what PGD and EOT attack)."""
    return smooth.forward_noisy


def smoothed_log_probs(smooth: Smooth, samples: int) -> LogitFn:
    """Log of the smoothed classifier's mean softmax over ``samples`` noisy copies (differentiable)."""

    def f(x: torch.Tensor) -> torch.Tensor:
        logits = smooth.forward_noisy(x.repeat_interleave(samples, dim=0)).float()
        probs = logits.softmax(1).view(x.shape[0], samples, -1).mean(1)
        return probs.clamp_min(1e-12).log()

    return f


def smoothed_mean_logits(smooth: Smooth, samples: int) -> LogitFn:
    """The mean of the logits over ``samples`` noisy copies (differentiable): the smoothed output of the
    ``logits`` aggregation rule, whose softmax it answers, so cross-entropy on it attacks that rule itself."""

    def f(x: torch.Tensor) -> torch.Tensor:
        logits = smooth.forward_noisy(x.repeat_interleave(samples, dim=0)).float()
        return logits.view(x.shape[0], samples, -1).mean(1)

    return f


def smoothed_probabilities(smooth: Smooth, samples: int, aggregation: Aggregation | None = None) -> LogitFn:
    """The served answer as a black box: per-image scores (probabilities or vote shares) from ``samples``
    fresh noisy copies, with the checkpoint's aggregation rule; no gradient flows."""
    rule = aggregation or smooth.smoothing.aggregation

    def f(x: torch.Tensor) -> torch.Tensor:
        logits = smooth.noisy_logits(x, [samples] * x.shape[0])
        rows = torch.arange(x.shape[0], device=logits.device).repeat_interleave(samples)
        return aggregate(logits, rows, x.shape[0], rule)[0]

    return f
