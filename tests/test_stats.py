"""``models/stats.py`` against ``scipy.stats``' own exact values, over the whole range the service uses."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import beta, binomtest, norm

from models.stats import clopper_pearson_lower, normal_ppf, sign_test_p


@st.composite
def counts(draw: st.DrawFn, most: int = 5000) -> tuple[int, int]:
    n = draw(st.integers(1, most))
    return draw(st.integers(0, n)), n


@settings(max_examples=400, deadline=None)
@given(counts())
def test_sign_test_is_scipys_two_sided_binomial_test_at_one_half(kn: tuple[int, int]) -> None:
    k, n = kn
    assert sign_test_p(k, n) == pytest.approx(binomtest(k, n, 0.5).pvalue, rel=1e-9, abs=1e-300)


def test_sign_test_known_values_and_edges() -> None:
    assert sign_test_p(10, 10) == pytest.approx(2 / 2**10)  # unanimous: both tails, one outcome each
    assert sign_test_p(0, 3) == pytest.approx(0.25) and sign_test_p(6, 10) == pytest.approx(0.75390625)
    assert sign_test_p(5, 10) == 1.0 and sign_test_p(1, 1) == 1.0  # a tie, and one vote, prove nothing
    with pytest.raises(ValueError, match="at least one trial"):
        sign_test_p(0, 0)


@settings(max_examples=400, deadline=None)
@given(counts(), st.sampled_from([1e-3, 0.01, 0.05, 0.5]))
def test_clopper_pearson_lower_is_the_beta_quantile(kn: tuple[int, int], alpha: float) -> None:
    k, n = kn
    expected = 0.0 if k == 0 else beta.ppf(alpha, k, n - k + 1)
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert 0 <= clopper_pearson_lower(k, n, alpha) <= k / n


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-12, 1 - 1e-12))
def test_normal_quantile_is_scipys(p: float) -> None:
    assert normal_ppf(p) == pytest.approx(norm.ppf(p), rel=1e-9, abs=1e-12)


def test_normal_quantile_edges() -> None:
    assert normal_ppf(0.5) == 0.0 and normal_ppf(1.0) == math.inf and normal_ppf(0.0) == -math.inf
