"""The three statistics smoothing needs, from ``scipy.special`` (a tenth of ``scipy.stats``' import time,
which the service would otherwise pay at every start):

* :func:`sign_test_p`: the two-sided binomial test of ``k`` successes in ``n`` at p = 1/2 (Cohen et al.'s
  PREDICT, and the sequential stopping rule), equal to ``scipy.stats.binomtest(k, n, 0.5).pvalue``;
* :func:`clopper_pearson_lower`: the one-sided exact lower confidence bound on a binomial proportion;
* :func:`normal_ppf`: the standard normal quantile, Phi^-1 (the certified radius is sigma * Phi^-1(p)).
"""

from __future__ import annotations

from scipy.special import betainc, betaincinv, ndtri


def sign_test_p(k: int, n: int) -> float:
    """Two-sided p-value of ``k`` successes in ``n`` fair trials. At p = 1/2 the distribution is symmetric,
    so the outcomes as unlikely as ``k`` are the two tails beyond ``max(k, n - k)``: twice the upper
    tail, capped at 1 (a tie, or anything at the centre, gives 1)."""
    if n < 1:
        raise ValueError(f"a binomial test needs at least one trial, got n = {n}")
    top = max(k, n - k)
    upper = float(betainc(top, n - top + 1, 0.5))  # P(X >= top) for X ~ Binomial(n, 1/2); over 1/2 at a tie
    return min(1.0, 2 * upper)


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) lower confidence bound on a binomial proportion (0 without successes)."""
    if successes == 0:
        return 0.0
    return float(betaincinv(successes, trials - successes + 1, alpha))


def normal_ppf(p: float) -> float:
    """Phi^-1(p): +inf at 1, -inf at 0."""
    return float(ndtri(p))
