"""CIFAR ResNets (He et al., 2016, section 4.2): ResNet-20/32/44/56 and their wider kin.

The network takes images in [0, 1]; normalization is its first layer, so every caller (training,
attacks, the service, the ONNX export) feeds the same pixel-space tensor. Shortcuts are the
parameter-free "option A" (strided identity, zero-padded channels) of the paper and of PNI's code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.pni import PNIConv2d, PNILinear
from models.spec import ArchitectureSpec, ModelSpec, NoiseLayerSpec

DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}

ConvFactory = Callable[..., nn.Conv2d]
LinearFactory = Callable[..., nn.Linear]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with the constants stored as buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, conv: ConvFactory):
        super().__init__()
        self.conv1 = conv(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv(cout, cout, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.pad = cout - cin

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; ``width`` multiplies the 16/32/64 channel stages."""

    def __init__(self, blocks_per_stage: int, width: int, num_classes: int,
                 conv: ConvFactory = nn.Conv2d, linear: LinearFactory = nn.Linear):
        super().__init__()
        channels = [16 * width, 32 * width, 64 * width]
        self.conv1 = conv(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        stages = []
        cin = channels[0]
        for i, cout in enumerate(channels):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride, conv))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = linear(channels[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class Classifier(nn.Module):
    """``net(normalize(x))`` for images ``x`` in [0, 1]; ``normalized_noise`` is added after normalizing
    (smoothing whose sigma is measured in normalized space)."""

    def __init__(self, normalize: Normalize, net: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor, normalized_noise: torch.Tensor | None = None) -> torch.Tensor:
        z = self.normalize(x)
        return self.net(z if normalized_noise is None else z + normalized_noise)


def _layer_factories(noise: NoiseLayerSpec) -> tuple[ConvFactory, LinearFactory]:
    if noise.type == "none":
        return nn.Conv2d, nn.Linear

    def conv(*args: object, **kwargs: object) -> nn.Conv2d:
        return PNIConv2d(*args, pni_mode=noise.mode, **kwargs)

    def linear(*args: object, **kwargs: object) -> nn.Linear:
        return PNILinear(*args, pni_mode=noise.mode, **kwargs)

    return conv, linear


def build_network(arch: ArchitectureSpec, noise: NoiseLayerSpec) -> CifarResNet:
    conv, linear = _layer_factories(noise)
    return CifarResNet(DEPTHS[arch.name], arch.width, arch.num_classes, conv, linear)


def build_classifier(spec: ModelSpec) -> Classifier:
    """The base classifier (normalization + ResNet) described by ``spec``, randomly initialised."""
    from models.pni import set_pni_enabled

    model = Classifier(
        Normalize(spec.normalization.mean, spec.normalization.std),
        build_network(spec.architecture, spec.noise_layers),
    )
    set_pni_enabled(model, spec.noise_layers.enabled_at_inference)
    return model
