"""The Open Inference Protocol (KServe v2) beside the native API, so KServe and Triton clients work.

One input: FP32 ``[N, 3, H, W]`` in [0, 1] or UINT8 ``[N, H, W, 3]``, as JSON ``data`` or with Triton's
binary tensor extension (``Inference-Header-Content-Length``). Request parameters: ``samples``,
``aggregation``, ``seed`` (if allowed). Outputs: ``probabilities`` FP32 ``[N, C]``, ``label`` INT64
``[N]``, ``vote_share`` FP32 ``[N]``; binary when the client asks (``binary_data``), JSON otherwise.
Errors answer ``{"error": "..."}`` with a 4xx status, as the protocol says.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.images import InputError, check_count, from_tensor
from service.metrics import samples_bucket
from service.state import ServiceState, read_body, serving, state_of

router = APIRouter(prefix="/v2", tags=["kserve-v2"])

HEADER_LENGTH = "inference-header-content-length"
NUMPY = {"FP32": np.float32, "UINT8": np.uint8, "INT64": np.int64}
AGGREGATIONS = ("vote", "softmax", "logits")


def _model_or_404(state: ServiceState, name: str) -> None:
    if state.manifest is None or name != state.manifest.name:
        raise InputError(f"model {name!r} is not served here (serving {state.model_name!r})", 404, "not_found")


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": "siam", "version": "1", "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def server_ready(request: Request) -> JSONResponse:
    state = state_of(request)
    ok = state.ready and not state.draining
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(name: str, request: Request) -> JSONResponse:
    state = state_of(request)
    _model_or_404(state, name)
    ok = state.ready and not state.draining
    return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(name: str, request: Request) -> dict[str, Any]:
    state = state_of(request)
    _model_or_404(state, name)
    spec = state.manifest.spec  # type: ignore[union-attr]
    size, classes = spec.architecture.input_size, spec.architecture.num_classes
    return {
        "name": name, "versions": ["1"], "platform": f"siam-{state.backend.name if state.backend else 'none'}",
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 3, size, size]},
                   {"name": "images", "datatype": "UINT8", "shape": [-1, size, size, 3]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "vote_share", "datatype": "FP32", "shape": [-1]}],
        "parameters": {"samples": spec.smoothing.default_samples, "aggregation": spec.smoothing.aggregation,
                       "sigma": spec.smoothing.sigma, "sigma_space": spec.smoothing.space,
                       "class_names": list(spec.class_names)},
    }


def parse_infer(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON part of an infer request and the binary tail (empty without the extension)."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InputError(f"{HEADER_LENGTH} {header_length!r} does not fit a body of {len(body)} bytes", 400)
        head, tail = body[: int(header_length)], body[int(header_length):]
    else:
        head, tail = body, b""
    if not head:
        raise InputError("empty body: send an inference request", 400)
    try:
        request = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"request is not valid JSON ({e})", 400) from e
    if not isinstance(request, dict):
        raise InputError("request must be a JSON object", 400)
    return request, tail


def input_array(request: dict[str, Any], tail: bytes) -> tuple[np.ndarray, str]:
    """The single input tensor, from JSON ``data`` or the binary tail."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InputError("send exactly one input tensor in \"inputs\"", 400)
    spec = inputs[0]
    datatype, shape = spec.get("datatype"), spec.get("shape")
    if datatype not in ("FP32", "UINT8"):
        raise InputError(f"datatype {datatype!r} is not supported; send FP32 [N,3,H,W] or UINT8 [N,H,W,3]")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InputError(f"shape must be a list of non-negative integers, got {shape!r}", 400)
    count = int(np.prod(shape)) if shape else 1
    dtype = NUMPY[datatype]
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != len(tail) or size != count * np.dtype(dtype).itemsize:
            raise InputError(f"binary_data_size {size!r} does not match shape {shape} ({datatype}) and the "
                             f"{len(tail)} bytes sent", 400)
        array = np.frombuffer(tail, dtype=dtype)
    else:
        try:
            array = np.asarray(spec.get("data"), dtype=dtype)
        except (TypeError, ValueError, OverflowError) as e:
            raise InputError(f"input data is not a list of {datatype} numbers ({e})", 400) from e
        if array.size != count:
            raise InputError(f"input data has {array.size} values, shape {shape} needs {count}", 400)
    return array.reshape(shape), datatype


def infer_parameters(request: dict[str, Any], state: ServiceState) -> tuple[int, str, int | None]:
    params = request.get("parameters") or {}
    smoothing, s = state.manifest.spec.smoothing, state.settings  # type: ignore[union-attr]
    samples = params.get("samples", smoothing.default_samples)
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise InputError(f"parameter samples must be an integer, got {samples!r}")
    if not 1 <= samples <= s.max_samples:
        raise InputError(f"samples must be between 1 and {s.max_samples}, got {samples}")
    aggregation = params.get("aggregation", smoothing.aggregation)
    if aggregation not in AGGREGATIONS:
        raise InputError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    seed = params.get("seed")
    if seed is not None:
        if not s.allow_seed:
            raise InputError("seed is disabled on this server (SIAM_ALLOW_SEED=true enables it)", 403)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise InputError(f"parameter seed must be an integer in [0, 2^63), got {seed!r}")
    return samples, aggregation, seed


def wants_binary(request: dict[str, Any]) -> dict[str, bool]:
    """Which outputs to return, and whether each is binary."""
    default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    names = ("probabilities", "label", "vote_share")
    asked = request.get("outputs")
    if not asked:
        return dict.fromkeys(names, default)
    chosen: dict[str, bool] = {}
    for out in asked:
        name = out.get("name") if isinstance(out, dict) else None
        if name not in names:
            raise InputError(f"unknown output {name!r}; outputs are {', '.join(names)}", 400)
        chosen[name] = bool((out.get("parameters") or {}).get("binary_data", default))
    return chosen


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request) -> Response:
    """Smoothed inference on a tensor batch; ``samples`` is a request parameter."""
    start = time.perf_counter()
    state, engine, manifest = serving(request)
    _model_or_404(state, name)
    body = await read_body(request, state.settings.max_body_bytes)
    payload, tail = parse_infer(body, request.headers.get(HEADER_LENGTH))
    samples, aggregation, seed = infer_parameters(payload, state)
    outputs = wants_binary(payload)
    array, datatype = input_array(payload, tail)
    check_count(array.shape[0] if array.ndim else 0, state.settings.max_images)
    images = from_tensor(array, datatype, manifest.spec.architecture.input_size)
    answers = await engine.predict(images, samples, aggregation, seed,  # type: ignore[arg-type]
                                   timeout=state.settings.request_timeout_s)
    state.metrics.prediction_duration.labels(samples_bucket(samples)).observe(time.perf_counter() - start)
    tensors = {
        "probabilities": np.array([a.prediction.probabilities for a in answers], dtype=np.float32),
        "label": np.array([a.prediction.label for a in answers], dtype=np.int64),
        "vote_share": np.array([a.prediction.vote_share for a in answers], dtype=np.float32),
    }
    return encode_response(name, payload.get("id"), tensors, outputs, samples)


def encode_response(name: str, request_id: Any, tensors: dict[str, np.ndarray], outputs: dict[str, bool],
                    samples: int) -> Response:
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    entries, blobs = [], []
    for out_name, binary in outputs.items():
        t = tensors[out_name]
        entry: dict[str, Any] = {"name": out_name, "datatype": datatypes[t.dtype], "shape": list(t.shape)}
        if binary:
            blob = np.ascontiguousarray(t).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = t.reshape(-1).tolist()
        entries.append(entry)
    result: dict[str, Any] = {"model_name": name, "model_version": "1", "outputs": entries,
                              "parameters": {"samples": samples}}
    if request_id is not None:
        result["id"] = request_id
    head = json.dumps(result).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})
