"""int8: the quantized graph, how the service finds it, and that it answers like the fp32 graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import load_checkpoint
from models.onnx import WEIGHTS_KEY, export_onnx, exported_weights
from models.quantize import CALIBRATION_KEY, INT8_FILE, quantize_int8
from service.backends import load_backend
from service.settings import Settings


def test_int8_graph_is_calibrated_served_and_close_to_fp32(tiny_checkpoint: Path) -> None:
    import onnx

    model, manifest = load_checkpoint(tiny_checkpoint)
    settings = Settings(checkpoint=tiny_checkpoint, precision="int8", chunk_rows=64, threads=1)
    with pytest.raises(RuntimeError, match=r"siam export .* --int8"):
        load_backend(settings)  # no int8 graph yet: a clear error, not a silent fp32 fallback
    fp32 = export_onnx(model, manifest.spec, tiny_checkpoint / "model.onnx", manifest.weights.sha256)
    calibration = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    path = quantize_int8(fp32, tiny_checkpoint / INT8_FILE, calibration, manifest.spec.smoothing.sigma,
                         {"split": "validation"})
    assert exported_weights(path) == manifest.weights.sha256
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert WEIGHTS_KEY in props and '"images": 64' in props[CALIBRATION_KEY]
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "RandomNormalLike" in ops  # noise stays in the graph
    backend, _ = load_backend(settings)
    assert backend.describe()["precision"] == "int8" and backend.name == "onnx"
    reference, _ = load_backend(Settings(checkpoint=tiny_checkpoint, precision="fp32", chunk_rows=64, threads=1,
                                         onnx_cache=tiny_checkpoint.parent / "cache"))
    images = torch.rand(8, 3, 32, 32)
    quantized = backend.logits(images, [32] * 8, [None] * 8).view(8, 32, -1).softmax(2).mean(1)
    exact = reference.logits(images, [32] * 8, [None] * 8).view(8, 32, -1).softmax(2).mean(1)
    assert (quantized - exact).abs().max() < 0.1  # random weights: close, not equal
    fed, _ = load_backend(settings.model_copy(update={"ort_noise": "torch"}))  # SIAM_ORT_NOISE=torch on int8
    assert fed.describe()["noise_drawn_by"] == "torch" and fed.describe()["precision"] == "int8"
    seeds = list(range(8))
    torch.testing.assert_close(fed.logits(images, [4] * 8, seeds), backend.logits(images, [4] * 8, seeds),
                               atol=1e-4, rtol=0)  # the same seeded noise, fed or drawn by the graph
    with pytest.raises(RuntimeError, match="onnx backend"):
        load_backend(Settings(checkpoint=tiny_checkpoint, precision="int8", backend="torch"))


def test_siam_export_int8_calibrates_on_the_checkpoints_validation_images(tiny_cifar_tar: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    from training import export, train

    out = tmp_path / "run"
    train.main(["--data", str(tiny_cifar_tar), "--cache-dir", str(tmp_path / "cache"), "--output", str(out),
                "--batch-size", "32", "--eval-images", "8", "--eval-attack-images", "4", "--threads", "1",
                "--epochs", "1", "--max-steps", "1", "--attack", "none", "--val-images", "40", "--val-seed", "3"])
    checkpoint = out / "checkpoint"
    export.main([str(checkpoint), "--int8", "--calibration-images", "16", "--data", str(tiny_cifar_tar),
                 "--cache-dir", str(tmp_path / "cache")])
    assert "serve with SIAM_PRECISION=int8" in capsys.readouterr().out
    props = {p.key: p.value for p in onnx.load(str(checkpoint / INT8_FILE)).metadata_props}
    assert '"split": "validation"' in props[CALIBRATION_KEY] and '"val_seed": 3' in props[CALIBRATION_KEY]
    assert '"images": 16' in props[CALIBRATION_KEY]
