"""The statistics behind every accuracy interval the project reports, and the latency it quotes beside them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from scipy.stats import binom

from training import measure
from training.measure import clopper_pearson, latency_ms


@pytest.mark.parametrize("n", [1, 10, 37, 1000])
def test_clopper_pearson_ends_where_the_binomial_tails_hold_a_quarter_of_alpha_each(n: int) -> None:
    """The exact interval's definition, checked with the binomial distribution itself rather than the beta
    quantiles the code uses: at the lower end, k or more successes are 2.5% likely; at the upper end, k or
    fewer are."""
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        low, high = clopper_pearson(k, n)
        assert 0 <= low <= k / n <= high <= 1
        if k == 0:
            assert low == 0.0
        else:
            assert binom.sf(k - 1, n, low) == pytest.approx(0.025, rel=1e-6)
        if k == n:
            assert high == 1.0
        else:
            assert binom.cdf(k, n, high) == pytest.approx(0.025, rel=1e-6)


def test_clopper_pearson_matches_published_values_and_widens_with_the_level() -> None:
    # 5 of 10: [0.1871, 0.8129]; 0 of 10: [0, 1 - 0.025 ** (1 / 10)] (Clopper & Pearson 1934; any textbook table).
    assert clopper_pearson(5, 10) == pytest.approx((0.187086, 0.812914), abs=1e-6)
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025 ** 0.1), abs=1e-9)
    assert clopper_pearson(10, 10) == pytest.approx((0.025 ** 0.1, 1.0), abs=1e-9)
    low95, high95 = clopper_pearson(400, 1000)
    low99, high99 = clopper_pearson(400, 1000, level=0.99)
    assert low99 < low95 < 0.4 < high95 < high99
    assert binom.sf(399, 1000, low99) == pytest.approx(0.005, rel=1e-6)


class _Timed:
    """A stand-in for ``Smooth`` whose predictions take the given milliseconds on a fake clock."""

    def __init__(self, durations_ms: list[float]) -> None:
        self.now = 0.0
        self.durations = list(durations_ms)
        self.calls: list[tuple[int, int]] = []

    def clock(self) -> float:
        return self.now

    def predict_batch(self, x: torch.Tensor, samples: int) -> Any:
        self.calls.append((x.shape[0], samples))
        self.now += self.durations.pop(0) / 1000


def test_latency_is_the_median_of_the_timed_runs_after_one_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    timed = _Timed([500.0, 5.0, 1.0, 4.0, 2.0, 3.0])  # a slow first call, then 1-5 ms
    monkeypatch.setattr(measure.time, "perf_counter", timed.clock)
    ms = latency_ms(timed, torch.zeros(7, 3, 32, 32), samples=16)  # type: ignore[arg-type]
    assert ms == pytest.approx(3.0)  # the warm-up's 500 ms is not counted
    assert timed.calls == [(1, 16)] * 6  # one image, the given m, five timed runs after the warm-up
    timed = _Timed([9.0, 8.0, 6.0, 7.0])
    monkeypatch.setattr(measure.time, "perf_counter", timed.clock)
    assert latency_ms(timed, torch.zeros(2, 3, 32, 32), samples=4, repeats=3) == pytest.approx(7.0)  # type: ignore[arg-type]


def test_a_paired_difference_over_one_image_or_none() -> None:
    from training.measure import paired_difference

    one = paired_difference(torch.tensor([True]), torch.tensor([False]))
    assert one == {"difference": 1.0, "ci95": [1.0, 1.0], "gained": 1, "lost": 0, "images": 1}
    none = paired_difference(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool))
    assert (none["gained"], none["lost"], none["images"]) == (0, 0, 0)
    assert all(v != v for v in (none["difference"], *none["ci95"]))  # NaN: no images, no difference
    assert sorted(none) == sorted(one)
