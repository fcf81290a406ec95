"""Parametric Noise Injection on weights (PNI-W, He, Rakin & Fan, CVPR 2019).

Each layer perturbs its weight with ``alpha * std(W) * eps``, ``eps ~ N(0, 1)``, where ``alpha`` is
learned (one value per layer, per output channel, or per weight element). As in the paper the noise
stays on at inference; ``enabled`` turns it off for ablations.

Two ways to draw the noise:

* no noise source attached (training): one draw per forward, shared by the whole batch, exactly as
  in PNI's reference code;
* a :class:`~models.noise.NoiseSource` attached (smoothed inference): one draw *per row*, so each
  noisy copy of an image sees its own weights and no image's answer depends on its batch mates.
  Per-row weights are applied as a grouped convolution (batched matmul for linear layers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.noise import NoiseSource

PNIMode = Literal["layer", "channel", "element"]


def _alpha_shape(weight: torch.Tensor, mode: PNIMode) -> tuple[int, ...]:
    if mode == "layer":
        return (1,)
    if mode == "channel":
        return (weight.shape[0],) + (1,) * (weight.dim() - 1)
    if mode == "element":
        return tuple(weight.shape)
    raise ValueError(f"unknown PNI mode {mode!r}; expected 'layer', 'channel' or 'element'")


class _PNIMixin:
    """Shared state and weight-noise logic for PNI conv and linear layers."""

    weight: torch.Tensor
    alpha: nn.Parameter
    enabled: bool
    noise_source: NoiseSource | None

    def _init_pni(self, mode: PNIMode, alpha_init: float) -> None:
        self.mode = mode
        self.alpha = nn.Parameter(torch.full(_alpha_shape(self.weight, mode), alpha_init))
        self.enabled = True
        self.noise_source = None

    def _noise_scale(self) -> torch.Tensor:
        # PNI scales the noise by the weight's spread, without a gradient through the std.
        return self.alpha * self.weight.detach().std()

    def shared_noisy_weight(self) -> torch.Tensor:
        """The weight with one noise draw shared by the whole batch (training path)."""
        if not self.enabled:
            return self.weight
        return self.weight + self._noise_scale() * torch.randn_like(self.weight)

    def per_row_weights(self, rows: int) -> torch.Tensor:
        """``(rows, *weight.shape)`` weights, each with its own noise draw from the noise source."""
        source = self.noise_source
        assert source is not None
        if source.rows != rows:
            raise ValueError(f"noise source has {source.rows} rows but the batch has {rows}")
        eps = source.normal(self.weight.shape, dtype=self.weight.dtype)
        return self.weight.unsqueeze(0) + self._noise_scale().unsqueeze(0) * eps

    def extra_repr(self) -> str:  # type: ignore[override]
        return f"{super().extra_repr()}, pni={self.mode}, enabled={self.enabled}"  # type: ignore[misc]


class PNIConv2d(_PNIMixin, nn.Conv2d):
    """``nn.Conv2d`` with PNI-W weight noise."""

    def __init__(self, *args: object, pni_mode: PNIMode = "layer", alpha_init: float = 0.25, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._init_pni(pni_mode, alpha_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.noise_source is None:
            return self._conv_forward(x, self.shared_noisy_weight(), self.bias)
        rows, cin, height, width = x.shape
        weights = self.per_row_weights(rows)
        out = F.conv2d(
            x.reshape(1, rows * cin, height, width),
            weights.reshape(rows * self.out_channels, *self.weight.shape[1:]),
            None if self.bias is None else self.bias.repeat(rows),
            self.stride,
            self.padding,
            self.dilation,
            self.groups * rows,
        )
        return out.reshape(rows, self.out_channels, *out.shape[2:])


class PNILinear(_PNIMixin, nn.Linear):
    """``nn.Linear`` with PNI-W weight noise."""

    def __init__(self, *args: object, pni_mode: PNIMode = "layer", alpha_init: float = 0.25, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._init_pni(pni_mode, alpha_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.noise_source is None:
            return F.linear(x, self.shared_noisy_weight(), self.bias)
        out = torch.einsum("bi,boi->bo", x, self.per_row_weights(x.shape[0]))
        return out if self.bias is None else out + self.bias


PNILayer = PNIConv2d | PNILinear


def pni_layers(model: nn.Module) -> list[PNIConv2d | PNILinear]:
    return [m for m in model.modules() if isinstance(m, PNIConv2d | PNILinear)]


def has_weight_noise(model: nn.Module) -> bool:
    """Whether ``model`` draws PNI-W weight noise (what decides per-copy weights, ONNX export and backend)."""
    return any(layer.enabled for layer in pni_layers(model))


def set_pni_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn PNI weight noise on or off everywhere in ``model`` (off only for ablations)."""
    for layer in pni_layers(model):
        layer.enabled = enabled


@contextmanager
def per_row_weight_noise(model: nn.Module, source: NoiseSource) -> Iterator[None]:
    """Within the block, every PNI layer of ``model`` draws its weight noise per row from ``source``."""
    layers = pni_layers(model)
    for layer in layers:
        layer.noise_source = source
    try:
        yield
    finally:
        for layer in layers:
            layer.noise_source = None
