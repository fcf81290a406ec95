"""The settings that travel with the weights.

Everything that changes what a smoothed model answers (architecture, normalization constants, the
noise scale and the space it is measured in, the default number of copies, the aggregation rule, the
weight-noise layers) lives here and is written into the checkpoint manifest, never left to flags.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Aggregation = Literal["vote", "softmax", "logits"]
NoiseSpace = Literal["pixel", "normalized"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchitectureSpec(_Strict):
    """A CIFAR ResNet: depth 6n+2, width multiplier, input size and number of classes."""

    name: Literal["resnet20", "resnet32", "resnet44", "resnet56"] = "resnet20"
    width: int = Field(1, ge=1, le=16)
    num_classes: int = Field(10, ge=2)
    input_size: int = Field(32, ge=8)


class NormalizationSpec(_Strict):
    """Per-channel mean/std applied by the model's first layer to images in [0, 1]."""

    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD


class NoiseLayerSpec(_Strict):
    """PNI-W weight noise: ``type='none'`` for plain layers."""

    type: Literal["none", "pni-w"] = "none"
    mode: Literal["layer", "channel", "element"] = "layer"
    enabled_at_inference: bool = True


class SmoothingSpec(_Strict):
    """How the smoothed classifier answers: N(0, sigma^2) input noise in ``space``, m copies."""

    sigma: float = Field(0.0625, ge=0.0)
    space: NoiseSpace = "pixel"
    default_samples: int = Field(16, ge=1)
    aggregation: Aggregation = "softmax"


class ModelSpec(_Strict):
    """Everything needed to rebuild and run a smoothed model, apart from the weights."""

    architecture: ArchitectureSpec = ArchitectureSpec()
    normalization: NormalizationSpec = NormalizationSpec()
    noise_layers: NoiseLayerSpec = NoiseLayerSpec()
    smoothing: SmoothingSpec = SmoothingSpec()
    class_names: tuple[str, ...] = CIFAR10_CLASSES

    @model_validator(mode="after")
    def _classes_match(self) -> ModelSpec:
        if len(self.class_names) != self.architecture.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names for {self.architecture.num_classes} classes"
            )
        return self
