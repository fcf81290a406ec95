"""int8 ONNX graphs for the CPU: ONNX Runtime's static quantization, calibrated on validation images.

The fp32 graph (``models/onnx.py``, noise inside) is quantized in QDQ form: convolution and linear
weights per channel to int8, activations to uint8 with ranges observed on ``calibration`` images fed
through the graph *with* its noise at the model's sigma, so the ranges are those the served copies
see. The noise itself (``RandomNormalLike`` and the add) stays in float. The graph records the weights
checksum, like the fp32 one, plus how it was calibrated.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from models.onnx import WEIGHTS_KEY

INT8_FILE = "model-int8.onnx"
CALIBRATION_KEY = "siam_int8_calibration"


class _Calibration:
    """ONNX Runtime's CalibrationDataReader: batches of images, each with the model's sigma."""

    def __init__(self, images: np.ndarray, sigma: float, batch: int = 64):
        self._batches: Iterator[dict[str, np.ndarray]] = (
            {"images": images[i:i + batch].astype(np.float32), "sigma": np.array([sigma], dtype=np.float32)}
            for i in range(0, len(images), batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray, sigma: float,
                  note: dict[str, object] | None = None) -> Path:
    """Write the int8 version of ``fp32_path`` calibrated on ``calibration`` (``[N, 3, H, W]`` in [0, 1])."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), _Calibration(calibration, sigma), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv", "Gemm", "MatMul"])
    source = onnx.load(str(fp32_path))
    props = {p.key: p.value for p in source.metadata_props}
    proto = onnx.load(str(out_path))
    onnx.helper.set_model_props(proto, {**({WEIGHTS_KEY: props[WEIGHTS_KEY]} if WEIGHTS_KEY in props else {}),
                                        CALIBRATION_KEY: json.dumps({"images": len(calibration), "sigma": sigma,
                                                                     **(note or {})})})
    onnx.save(proto, str(out_path))
    return out_path
