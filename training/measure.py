"""Statistics and timing shared by ``siam evaluate`` and the robustness report (kept below both, so
neither imports the other): exact binomial intervals, a paired difference, one prediction's latency."""

from __future__ import annotations

import math
import time

import torch
from scipy.stats import beta, norm

from models.smooth import Smooth


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided exact binomial confidence interval for k successes out of n."""
    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return low, high


def paired_difference(after: torch.Tensor, before: torch.Tensor, level: float = 0.95) -> dict[str, float]:
    """Accuracy of ``after`` minus accuracy of ``before`` on the same images, with a Wald interval for
    paired proportions (Newcombe's method 1). Pairing is what makes a small change visible: only the
    images on which the two disagree carry information, so the interval is far narrower than the
    difference of two independent intervals."""
    n = int(after.numel())
    if n == 0:
        return {"difference": float("nan"), "ci95": [float("nan"), float("nan")], "gained": 0, "lost": 0, "images": 0}
    gained = int((after & ~before).sum())
    lost = int((~after & before).sum())
    d = (gained - lost) / n
    se = math.sqrt(max(gained + lost - (gained - lost) ** 2 / n, 0.0)) / n
    z = float(norm.ppf(1 - (1 - level) / 2))
    return {"difference": d, "ci95": [d - z * se, d + z * se], "gained": gained, "lost": lost, "images": n}


def latency_ms(smooth: Smooth, x: torch.Tensor, samples: int, repeats: int = 5) -> float:
    """Median wall time of one smoothed prediction of one image with ``samples`` copies."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        smooth.predict_batch(x[:1], samples)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # first run is a warm-up
            times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]
