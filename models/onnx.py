"""ONNX export of the noisy base model, with the smoothing noise inside the graph.

The graph computes ``logits = f(images + sigma * N(0, I))`` (or the noise added after normalization
when sigma is in normalized space) with ``RandomNormalLike``, so ONNX Runtime draws the noise on its
own device, one draw per row. ``sigma`` is a graph input: feed the manifest's sigma to serve and
``0`` to compare with PyTorch on noise-free input. The batch axis is dynamic.

With ``SIAM_ORT_NOISE=torch`` the service feeds that draw in instead (:func:`with_noise_input`): ONNX
Runtime's CPU ``RandomNormalLike`` draws on one thread at about 12 ns a number, ``torch.randn`` at about
4, and the noise of a 32 x 32 image is 3,072 numbers (``docs/speed.md`` says what that buys).

PNI-W models are refused: per-row weight noise has no faithful ONNX form here, and a graph with one
weight draw per batch would make an image's answer depend on its batch mates.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from models.pni import has_weight_noise
from models.resnet import Classifier
from models.spec import ModelSpec

INPUT_NAMES = ["images", "sigma"]
NOISE_INPUT = "noise"
"""The input :func:`with_noise_input` gives a graph in place of its ``RandomNormalLike``."""
OUTPUT_NAMES = ["logits"]
OPSET = 17
WEIGHTS_KEY = "siam_weights_sha256"
"""Metadata key naming the checksum of the weights a graph was exported from."""


class NoisyGraph(nn.Module):
    """What the ONNX graph computes: the base classifier under Gaussian input noise of scale ``sigma``
    (with ``noise=False``, the bare classifier: the benchmarks' noise-free reference)."""

    def __init__(self, model: Classifier, space: str, noise: bool):
        super().__init__()
        self.model = model
        self.space = space
        self.noise = noise

    def forward(self, images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not self.noise:
            return self.model(images)
        noise = torch.randn_like(images) * sigma
        if self.space == "pixel":
            return self.model(images + noise)
        return self.model(images, normalized_noise=noise)


def export_onnx(model: Classifier, spec: ModelSpec, path: str | Path, weights_sha256: str | None = None,
                noise: bool = True) -> Path:
    """Write the noisy base model to ``path`` (ONNX, dynamic batch axis); returns the path.

    ``weights_sha256`` is stored in the graph's metadata, so the service can tell a checkpoint's own
    ``model.onnx`` from a stale one and use it instead of exporting again. ``noise=False`` writes the
    bare classifier (its only input ``images``), never served: the limit the benchmarks compare with."""
    if has_weight_noise(model):
        raise ValueError("ONNX export does not support PNI-W weight noise; serve this model with the torch backend")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = spec.architecture.input_size
    # A copy: export must neither move the caller's model nor change its train/eval mode.
    graph = NoisyGraph(copy.deepcopy(model).cpu(), spec.smoothing.space, noise).eval()
    example = (torch.rand(2, 3, size, size), torch.tensor([spec.smoothing.sigma], dtype=torch.float32))
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices say nothing about this graph
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, example, str(path), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET, dynamo=False,
        )
    if weights_sha256:
        import onnx

        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, {WEIGHTS_KEY: weights_sha256})
        onnx.save(proto, str(path))
    return path


def with_noise_input(path: str | Path) -> bytes:
    """The graph at ``path`` with its one ``RandomNormalLike`` node replaced by an input, ``noise``: the
    standard-normal draw for every row, shaped like ``images``, which the graph still scales by ``sigma``
    and adds where it added its own draw. Returns the serialized model, for ``InferenceSession``."""
    import onnx

    proto = onnx.load(str(path))
    draws = [n for n in proto.graph.node if n.op_type == "RandomNormalLike"]
    if len(draws) != 1:
        raise ValueError(f"{path}: expected one RandomNormalLike node (the smoothing noise), found {len(draws)}")
    draw = draws[0]
    images = next(i for i in proto.graph.input if i.name == draw.input[0])
    noise = onnx.ValueInfoProto()
    noise.CopyFrom(images)
    noise.name = NOISE_INPUT
    proto.graph.node.remove(draw)
    for node in proto.graph.node:
        node.input[:] = [NOISE_INPUT if name == draw.output[0] else name for name in node.input]
    proto.graph.input.append(noise)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def exported_weights(path: str | Path) -> str | None:
    """The weights checksum a graph says it was exported from (None for graphs that do not say)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # a corrupt or foreign file is simply not the checkpoint's graph
        return None
    return next((p.value for p in proto.metadata_props if p.key == WEIGHTS_KEY), None)


def default_providers() -> list[str]:
    """ONNX Runtime providers to ask for: CUDA first only where a GPU is actually usable.

    ``onnxruntime-gpu`` lists the CUDA provider even on machines without a GPU and then logs errors
    while falling back; asking for it only when CUDA works keeps the fallback quiet and explicit.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if torch.cuda.is_available() and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
