"""Where the random numbers come from (``models/noise.py``) and how PNI-W layers use them (``models/pni.py``):
known answers, shapes and dtypes, one draw per row, and the bias and dtype paths of both layer kinds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models.noise import DeviceNoise, SeededNoise, row_seed
from models.pni import PNIConv2d, PNILinear, has_weight_noise, per_row_weight_noise, set_pni_enabled

MASK63 = (1 << 63) - 1


def test_row_seed_is_splitmix64_on_seed_times_gamma_plus_copy() -> None:
    """SplitMix64's first outputs from state 0 (Vigna's reference values), which ``row_seed(k, -1)`` must
    give: its state is image_seed * 0x9E3779B97F4A7C15 + copy_index + 1, kept to 63 bits."""
    reference = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [row_seed(k, -1) for k in (1, 2, 3)] == [v & MASK63 for v in reference]


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**62), start=st.integers(0, 2**20))
def test_row_seeds_are_63_bit_and_distinct_across_copies_and_images(seed: int, start: int) -> None:
    copies = [row_seed(seed, j) for j in range(start, start + 64)]
    assert all(0 <= s <= MASK63 for s in copies)
    assert len(set(copies)) == 64
    assert row_seed(seed + 1, start) != row_seed(seed, start)


def test_seeded_rows_are_their_own_generators_in_order() -> None:
    ranges = [(2, 5), (0, 3)]
    source = SeededNoise.for_copies([7, 9], ranges, "cpu")
    assert source.rows == 6 and source.device == torch.device("cpu")
    draws = source.normal((3, 4), dtype=torch.float64)
    assert draws.shape == (6, 3, 4) and draws.dtype == torch.float64
    seeds = [row_seed(7, j) for j in range(2, 5)] + [row_seed(9, j) for j in range(0, 3)]
    for row, seed in zip(draws, seeds, strict=True):
        expected = torch.randn((3, 4), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(row, expected)
    with pytest.raises(ValueError):  # a seed without its range of copies (or the reverse) is a caller's bug
        SeededNoise.for_copies([7, 9], [(0, 3)], "cpu")
    empty = SeededNoise([], "cpu").normal((2, 3), dtype=torch.float64)
    assert empty.shape == (0, 2, 3) and empty.dtype == torch.float64


def test_seeded_noise_is_standard_normal() -> None:
    draws = SeededNoise(list(range(1000)), "cpu").normal((64,))
    assert abs(draws.mean().item()) < 0.01 and abs(draws.std().item() - 1) < 0.01
    rows = draws.view(1000, 64)
    assert abs(torch.corrcoef(rows[:, :2].T)[0, 1].item()) < 0.1  # neighbouring seeds are not correlated


def test_device_noise_has_one_row_per_copy_and_follows_its_generator() -> None:
    a = DeviceNoise(5, "cpu", torch.Generator().manual_seed(3)).normal((2, 2), dtype=torch.float64)
    b = DeviceNoise(5, "cpu", torch.Generator().manual_seed(3)).normal((2, 2), dtype=torch.float64)
    assert a.shape == (5, 2, 2) and a.dtype == torch.float64 and torch.equal(a, b)
    assert len({tuple(row.flatten().tolist()) for row in a}) == 5
    source = DeviceNoise(2, "cpu")
    assert source.rows == 2 and source.device == torch.device("cpu") and source.generator is None


def test_pni_modes_defaults_and_a_wrong_mode() -> None:
    conv = PNIConv2d(3, 4, kernel_size=3)
    assert conv.mode == "layer" and conv.alpha.shape == (1,) and conv.alpha.item() == 0.25
    assert "pni=layer, enabled=True" in repr(conv)
    linear = PNILinear(8, 5, bias=False)
    assert linear.bias is None and linear.mode == "layer" and linear.alpha.item() == 0.25  # kwargs reach nn.Linear
    with pytest.raises(ValueError, match="unknown PNI mode 'bogus'; expected 'layer', 'channel' or 'element'"):
        PNILinear(8, 5, pni_mode="bogus")  # type: ignore[arg-type]


def test_shared_noise_keeps_the_bias_and_scales_with_alpha_times_the_weight_spread() -> None:
    torch.manual_seed(0)
    conv = PNIConv2d(3, 4, kernel_size=3, padding=1, alpha_init=0.5)
    linear = PNILinear(8, 5, alpha_init=0.5)
    for layer in (conv, linear):
        torch.nn.init.normal_(layer.bias, 3.0)
    x, v = torch.rand(2, 3, 8, 8), torch.rand(2, 8)
    set_pni_enabled(conv, False)
    set_pni_enabled(linear, False)
    with torch.no_grad():
        assert torch.allclose(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-6)
        assert torch.allclose(linear(v), F.linear(v, linear.weight, linear.bias), atol=1e-6)
        set_pni_enabled(linear, True)
        deltas = torch.stack([linear.shared_noisy_weight() - linear.weight for _ in range(400)])
    spread = 0.5 * linear.weight.std().item()  # alpha * std(W)
    assert abs(deltas.mean().item()) < 0.05 * spread  # 16,000 draws: about 12 standard errors
    assert deltas.std().item() == pytest.approx(spread, rel=0.05)


def test_per_row_linear_equals_explicit_weights_with_bias_in_double() -> None:
    torch.manual_seed(0)
    layer = PNILinear(8, 5, pni_mode="channel", alpha_init=0.5).double()
    torch.nn.init.normal_(layer.bias, 3.0)
    x = torch.rand(3, 8, dtype=torch.float64)
    seeds = [4, 5, 6]
    with torch.no_grad(), per_row_weight_noise(layer, SeededNoise(seeds, "cpu")):
        out = layer(x)
    assert out.dtype == torch.float64
    scale = layer.alpha * layer.weight.std()
    for r, seed in enumerate(seeds):
        eps = torch.randn(layer.weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        expected = F.linear(x[r : r + 1], layer.weight + scale * eps, layer.bias)
        assert torch.allclose(out[r : r + 1], expected, atol=1e-12)


def test_per_row_linear_without_bias() -> None:
    layer = PNILinear(8, 5, bias=False)
    x = torch.rand(2, 8)
    with torch.no_grad(), per_row_weight_noise(layer, SeededNoise([1, 2], "cpu")):
        out = layer(x)
    eps = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(2))
    expected = F.linear(x[1:], layer.weight + layer.alpha * layer.weight.std() * eps)
    assert torch.allclose(out[1:], expected.detach(), atol=1e-6)


def test_a_noise_source_must_have_a_row_per_input_row() -> None:
    layer = PNILinear(8, 5)
    with per_row_weight_noise(layer, SeededNoise([1, 2, 3], "cpu")), \
            pytest.raises(ValueError, match="noise source has 3 rows but the batch has 2"):
        layer(torch.rand(2, 8))


def test_weight_noise_is_reported_while_any_layer_draws_it() -> None:
    model = torch.nn.Sequential(PNILinear(8, 8), torch.nn.ReLU(), PNILinear(8, 2))
    assert has_weight_noise(model)
    set_pni_enabled(model, False)
    assert not has_weight_noise(model)
    model[2].enabled = True
    assert has_weight_noise(model)
    assert not has_weight_noise(torch.nn.Linear(2, 2))
