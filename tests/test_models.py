"""Networks and PNI-W layers."""

from __future__ import annotations

import pytest
import torch

from models import ArchitectureSpec, ModelSpec, NoiseLayerSpec, build_classifier
from models.noise import SeededNoise
from models.pni import PNIConv2d, PNILinear, per_row_weight_noise, pni_layers, set_pni_enabled
from models.resnet import DEPTHS
from tests.conftest import make_model


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_resnet_depths_and_output_shape(name: str) -> None:
    spec = ModelSpec(architecture=ArchitectureSpec(name=name))
    model = build_classifier(spec).eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == 6 * DEPTHS[name] + 2  # conv layers + the final linear layer
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 10)


def test_resnet20_size_and_width_multiplier() -> None:
    base = build_classifier(ModelSpec())
    wide = build_classifier(ModelSpec(architecture=ArchitectureSpec(width=4)))
    count = sum(p.numel() for p in base.parameters())
    assert 0.26e6 < count < 0.28e6  # the paper's ResNet-20: 0.27M parameters
    assert wide.net.fc.in_features == 256
    assert sum(p.numel() for p in wide.parameters()) > 10 * count


def test_normalization_is_inside_the_model() -> None:
    model, spec = make_model()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(spec.normalization.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.normalization.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.net((x - mean) / std), atol=1e-6)


@pytest.mark.parametrize(("mode", "shape"), [("layer", (1,)), ("channel", (16, 1, 1, 1)), ("element", (16, 3, 3, 3))])
def test_pni_alpha_granularity(mode: str, shape: tuple[int, ...]) -> None:
    model, _ = make_model(pni=mode)
    assert tuple(model.net.conv1.alpha.shape) == shape
    assert all(isinstance(m, PNIConv2d | PNILinear) for m in pni_layers(model))
    assert len(pni_layers(model)) == 20


def test_pni_noise_stays_on_in_eval_and_switches_off() -> None:
    model, _ = make_model(pni="layer")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))  # eval mode, noise still on
        set_pni_enabled(model, False)
        assert torch.equal(model(x), model(x))


def test_pni_enabled_at_inference_flag_comes_from_the_spec() -> None:
    spec = ModelSpec(noise_layers=NoiseLayerSpec(type="pni-w", enabled_at_inference=False))
    assert not any(layer.enabled for layer in pni_layers(build_classifier(spec)))


def test_per_row_weight_noise_matches_explicit_weights() -> None:
    """Row r of a per-row PNI conv equals a plain conv with W + alpha*std(W)*eps_r."""
    torch.manual_seed(0)
    layer = PNIConv2d(3, 4, kernel_size=3, padding=1, bias=True, pni_mode="channel", alpha_init=0.5)
    x = torch.rand(3, 3, 8, 8)
    seeds = [11, 12, 13]
    with torch.no_grad(), per_row_weight_noise(layer, SeededNoise(seeds, "cpu")):
        out = layer(x)
    scale = layer.alpha * layer.weight.std()
    for r, seed in enumerate(seeds):
        eps = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(seed))
        expected = torch.nn.functional.conv2d(x[r : r + 1], layer.weight + scale * eps, layer.bias, padding=1)
        assert torch.allclose(out[r : r + 1], expected, atol=1e-5)


def test_per_row_linear_rows_draw_independent_weights() -> None:
    torch.manual_seed(0)
    layer = PNILinear(8, 5, pni_mode="element")
    x = torch.rand(1, 8).repeat(4, 1)
    with torch.no_grad(), per_row_weight_noise(layer, SeededNoise([1, 2, 3, 1], "cpu")):
        out = layer(x)
    assert not torch.allclose(out[0], out[1])
    assert torch.allclose(out[0], out[3])  # same seed, same draw
    assert layer.noise_source is None  # detached after the block
