"""Building blocks of the robustness report: accuracy at every m, the noise-free surrogate, the eps sweep
and its sanity check, certified accuracy, and the choice of sigma and m on validation images.

Kept free of I/O so the tests can drive each piece on a tiny model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from models.pni import pni_layers
from models.resnet import Classifier
from models.smooth import Certificate, Smooth, aggregate, certify_from_counts
from models.spec import Aggregation
from training.measure import clopper_pearson

Attack = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
"""``attack(x, y, eps) -> adversarial x``."""
Judge = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``judge(x, y) -> bool per image``: does the classifier under test get it right?"""


@dataclass(frozen=True)
class Answers:
    """One independent set of noisy copies per image, read at several m (prefixes of the set)."""

    labels: dict[int, torch.Tensor]
    """m -> ``[B]`` the smoothed answer (the aggregation rule) from the first m copies."""
    votes: dict[int, torch.Tensor]
    """m -> ``[B, C]`` how many of the first m copies the base model puts in each class."""


def answers_by_m(smooth: Smooth, x: torch.Tensor, samples: Sequence[int],
                 aggregation: Aggregation | None = None) -> Answers:
    """The smoothed answer of every image at each m in ``samples``, from one draw of ``max(samples)``
    noisy copies per image; the answer at m aggregates the first m of them, so every m costs nothing
    extra (each is still an answer from m independent copies). Results are on the CPU."""
    rule = aggregation or smooth.smoothing.aggregation
    return answers_by_rule(smooth, x, samples, [rule])[rule]


def answers_by_rule(smooth: Smooth, x: torch.Tensor, samples: Sequence[int],
                    rules: Sequence[Aggregation]) -> dict[Aggregation, Answers]:
    """:func:`answers_by_m` under each aggregation rule in ``rules``, all from the same noisy copies, so the
    rules differ only in how they read them (and the vote counts are the same for all)."""
    top = max(samples)
    logits = smooth.noisy_logits(x, [top] * x.shape[0]).view(x.shape[0], top, -1)
    answers = {}
    for rule in rules:
        labels, votes = {}, {}
        for m in samples:
            rows = torch.arange(x.shape[0], device=logits.device).repeat_interleave(m)
            scores, counts = aggregate(logits[:, :m].reshape(-1, logits.shape[-1]), rows, x.shape[0], rule)
            labels[m], votes[m] = scores.argmax(1).cpu(), counts.round().long().cpu()
        answers[rule] = Answers(labels, votes)
    return answers


def correct_by_m(smooth: Smooth, x: torch.Tensor, y: torch.Tensor, samples: Sequence[int],
                 aggregation: Aggregation | None = None) -> dict[int, torch.Tensor]:
    """Per-image correctness of the smoothed classifier at each m in ``samples`` (see :func:`answers_by_m`)."""
    labels = answers_by_m(smooth, x, samples, aggregation).labels
    return {m: labels[m] == y.cpu() for m in samples}


def certify_by_m(selection: Answers, estimation: Answers, sigma: float,
                 alpha: float = 0.001) -> dict[int, list[Certificate]]:
    """Cohen's CERTIFY at each m with n0 = n = m: the class from the votes of one set of m copies, its
    probability bounded on an independent set of m copies (a certificate bought with 2m copies)."""
    return {m: [certify_from_counts(sel, est, alpha, sigma)
                for sel, est in zip(selection.votes[m], estimation.votes[m], strict=True)]
            for m in selection.votes}


def accuracy_entry(correct: torch.Tensor) -> dict[str, Any]:
    """Accuracy of a per-image correctness vector, with its 95% Clopper-Pearson interval."""
    k, n = int(correct.sum()), int(correct.numel())
    low, high = clopper_pearson(k, n) if n else (0.0, 1.0)
    return {"accuracy": k / n if n else float("nan"), "ci95": [low, high], "correct": k, "images": n}


@contextmanager
def noise_free(model: Classifier) -> Iterator[Classifier]:
    """The base model with PNI weight noise off (input noise is never added by the model itself);
    restores each layer's previous setting on exit."""
    layers = pni_layers(model)
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, before, strict=True):
            layer.enabled = enabled


def eps_sweep(attack: Attack, judge: Judge, x: torch.Tensor, y: torch.Tensor,
              eps_values: Sequence[float]) -> list[dict[str, Any]]:
    """Accuracy under ``attack`` at each eps (eps 0 is the clean accuracy), with intervals."""
    rows = []
    for eps in eps_values:
        adv = x if eps == 0 else attack(x, y, eps)
        rows.append({"eps": eps, **accuracy_entry(judge(adv, y))})
    return rows


def sweep_problems(rows: Sequence[dict[str, Any]], tolerance: float = 0.02, floor: float = 0.05,
                   large_eps: float = 32 / 255) -> list[str]:
    """What is wrong with an eps sweep (empty when nothing is): accuracy that rises with eps by more than
    ``tolerance`` (or two images' worth, whichever is larger), or that stays above ``floor`` (or one
    image's worth) at eps >= ``large_eps``. Either one is a classic sign of gradient masking."""
    problems = []
    ordered = sorted(rows, key=lambda r: r["eps"])
    for prev, cur in itertools.pairwise(ordered):
        slack = max(tolerance, 2 / max(cur["images"], 1))
        if cur["accuracy"] > prev["accuracy"] + slack:
            problems.append(f"accuracy rises from {100 * prev['accuracy']:.1f}% at eps {255 * prev['eps']:g}/255 "
                            f"to {100 * cur['accuracy']:.1f}% at eps {255 * cur['eps']:g}/255")
    for row in ordered:
        if row["eps"] >= large_eps - 1e-12 and row["accuracy"] > max(floor, 1 / max(row["images"], 1)) + 1e-12:
            problems.append(f"accuracy is still {100 * row['accuracy']:.1f}% at eps {255 * row['eps']:g}/255 "
                            f"(expected about 0%)")
    if not any(r["eps"] >= large_eps - 1e-12 for r in ordered):
        problems.append(f"the sweep never reaches eps {255 * large_eps:g}/255, so it cannot show accuracy falling to 0")
    return problems


def certified_accuracy(certificates: Sequence[Certificate], labels: Sequence[int], radii: Sequence[float],
                       scale: float = 1.0) -> list[dict[str, Any]]:
    """Cohen et al.'s certified accuracy at each L2 radius: right label, not abstained, radius >= r.

    ``scale`` converts the certificates' radii to the space ``radii`` are given in.
    """
    out = []
    for r in radii:
        hits = torch.tensor([c.label == y and c.radius * scale >= r for c, y in zip(certificates, labels, strict=True)])
        out.append({"radius": r, **accuracy_entry(hits)})
    return out


def choose_operating_point(rows: Sequence[dict[str, Any]], tolerance: float = 0.01) -> dict[str, Any]:
    """Pick sigma and m from validation rows ``{sigma, samples, clean, robust}`` (accuracies).

    sigma: the one with the best robust accuracy at its largest m (ties: better clean accuracy, then
    smaller sigma). m: the smallest m whose robust accuracy at that sigma is within ``tolerance`` of the
    best over m, since every extra copy costs latency.
    """
    if not rows:
        raise ValueError("no validation results to choose from")
    top_m = max(r["samples"] for r in rows)
    at_top = [r for r in rows if r["samples"] == top_m]
    best = max(at_top, key=lambda r: (r["robust"], r["clean"], -r["sigma"]))
    sigma = best["sigma"]
    curve = sorted((r for r in rows if r["sigma"] == sigma), key=lambda r: r["samples"])
    peak = max(r["robust"] for r in curve)
    chosen = next(r for r in curve if r["robust"] >= peak - tolerance - 1e-12)
    return {"sigma": sigma, "samples": chosen["samples"], "robust": chosen["robust"], "clean": chosen["clean"],
            "rule": f"sigma with the best robust validation accuracy at m={top_m}; then the smallest m within "
                    f"{100 * tolerance:g} points of the best m at that sigma"}
