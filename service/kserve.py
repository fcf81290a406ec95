"""The Open Inference Protocol (KServe v2) beside the native API, so KServe and Triton clients work.

One input: FP32 ``[N, 3, H, W]`` in [0, 1] or UINT8 ``[N, H, W, 3]``, as JSON ``data`` or with Triton's
binary tensor extension (``Inference-Header-Content-Length``). Request parameters: ``samples``,
``aggregation``, ``seed`` (if allowed), ``confidence`` (sequential sampling). Outputs: ``probabilities``
FP32 ``[N, C]``, ``label`` INT64 ``[N]``, ``vote_share`` FP32 ``[N]`` (with ``confidence``, also
``samples_used`` INT64 ``[N]`` and ``decided`` BOOL ``[N]``); binary when the client asks
(``binary_data``), JSON otherwise.
Errors answer ``{"error": "..."}`` with a 4xx status, as the protocol says.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from models.spec import ModelSpec, SmoothingSpec
from service.auth import require_access
from service.images import InputError, check_count, from_tensor
from service.metrics import samples_bucket
from service.sequential import predict_sequential
from service.settings import Settings
from service.state import ServiceState, read_body, serving, state_of, unless_client_leaves


class ErrorV2(BaseModel):
    error: str


class TensorIn(BaseModel):
    """One input tensor; ``data`` (row-major, flat or nested) or, with the binary extension,
    ``parameters.binary_data_size`` bytes after the JSON header."""

    model_config = ConfigDict(extra="allow")
    name: str
    datatype: str = Field(description="FP32 ([N,3,H,W] in [0, 1]) or UINT8 ([N,H,W,3])")
    shape: list[Annotated[StrictInt, Field(ge=0)]]
    parameters: dict[str, Any] | None = None
    data: Any = None


class OutputIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(description="probabilities, label or vote_share")
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true for a binary tensor")


class InferRequestIn(BaseModel):
    """A KServe v2 inference request. ``parameters``: samples, aggregation, seed (if allowed),
    binary_data_output."""

    model_config = ConfigDict(extra="allow")
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[TensorIn] = Field(min_length=1, max_length=1, description="exactly one input tensor")
    outputs: list[OutputIn] | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorV2, "description": text} for code, text in {
        400: "malformed request", 401: "missing or unknown API key (when the server has keys)",
        403: "seed not allowed", 404: "model or version not served here", 413: "body or image count over the limit",
        422: "invalid tensor or parameter", 429: "rate limit exceeded (Retry-After)",
        503: "queue full, deadline cannot be met, shutting down or not ready (Retry-After)",
        504: "deadline passed"}.items()
}
NOT_FOUND = {404: ERRORS[404]}
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/InferRequestIn"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "the JSON request, then the binary tensors "
                                 "(Inference-Header-Content-Length says where the JSON ends)"},
}}}


def openapi_schemas() -> dict[str, Any]:
    """The request models for the OpenAPI document's components (the routes read the raw body, for the
    binary extension, so FastAPI does not see them)."""
    schema = InferRequestIn.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {"InferRequestIn": schema, **defs}


router = APIRouter(prefix="/v2", tags=["kserve-v2"])
VERSION = "1"

HEADER_LENGTH = "inference-header-content-length"
NUMPY = {"FP32": np.float32, "UINT8": np.uint8, "INT64": np.int64}
AGGREGATIONS = ("vote", "softmax", "logits")


def _model_or_404(state: ServiceState, name: str, version: str = VERSION) -> None:
    if state.manifest is None or name != state.manifest.name:
        raise InputError(f"model {name!r} is not served here (serving {state.model_name!r})", 404, "not_found")
    if version != VERSION:
        raise InputError(f"model {name!r} has no version {version!r} (versions: {VERSION})", 404, "not_found")


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


@router.get("/models/{name}/ready", responses=NOT_FOUND)
async def model_ready(name: str, request: Request) -> JSONResponse:
    return await model_version_ready(name, VERSION, request)


@router.get("/models/{name}/versions/{version}/ready", responses=NOT_FOUND)
async def model_version_ready(name: str, version: str, request: Request) -> JSONResponse:
    state = state_of(request)
    _model_or_404(state, name, version)
    ok = state.ready and not state.draining
    return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}", responses={k: ERRORS[k] for k in (401, 404, 429)},
            dependencies=[Depends(require_access)])
async def model_metadata(name: str, request: Request) -> dict[str, Any]:
    return await model_version_metadata(name, VERSION, request)


@router.get("/models/{name}/versions/{version}", responses={k: ERRORS[k] for k in (401, 404, 429)},
            dependencies=[Depends(require_access)])
async def model_version_metadata(name: str, version: str, request: Request) -> dict[str, Any]:
    state = state_of(request)
    _model_or_404(state, name, version)
    spec = state.manifest.spec  # type: ignore[union-attr]
    size, classes = spec.architecture.input_size, spec.architecture.num_classes
    return {
        "name": name, "versions": [VERSION], "platform": f"siam-{state.backend.name if state.backend else 'none'}",
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 3, size, size]},
                   {"name": "images", "datatype": "UINT8", "shape": [-1, size, size, 3]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "vote_share", "datatype": "FP32", "shape": [-1]}],
        "parameters": {"samples": spec.smoothing.default_samples, "aggregation": spec.smoothing.aggregation,
                       "sigma": spec.smoothing.sigma, "sigma_space": spec.smoothing.space,
                       "class_names": list(spec.class_names)},
    }


def parse_infer(body: bytes, header_length: str | None) -> tuple[InferRequestIn, bytes]:
    """The JSON part of an infer request, validated, and the binary tail (empty without the extension)."""
    if header_length is not None:
        if not re.fullmatch(r"[0-9]{1,12}", header_length) or int(header_length) > len(body):
            raise InputError(f"{HEADER_LENGTH} {header_length!r} does not fit a body of {len(body)} bytes", 400)
        head, tail = body[: int(header_length)], body[int(header_length):]
    else:
        head, tail = body, b""
    if not head:
        raise InputError("empty body: send an inference request", 400)
    try:  # pydantic's JSON parser refuses absurd nesting itself (recursion limit), with a ValidationError
        return InferRequestIn.model_validate_json(head), tail
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'request'}: {err['msg']}" for err in e.errors())
        raise InputError(f"invalid inference request: {problems}", 400) from e


def input_array(request: InferRequestIn, tail: bytes, max_images: int, size: int) -> tuple[np.ndarray, str]:
    """The single input tensor, from JSON ``data`` or the binary tail; its size is checked from the
    shape (in Python integers, which do not overflow) before anything is allocated."""
    spec = request.inputs[0]
    datatype, shape = spec.datatype, spec.shape
    if datatype not in ("FP32", "UINT8"):
        raise InputError(f"datatype {datatype!r} is not supported; send FP32 [N,3,H,W] or UINT8 [N,H,W,3]")
    count = math.prod(shape)
    if len(shape) != 4 or count > max_images * 3 * size * size:
        expected = f"[N, 3, {size}, {size}]" if datatype == "FP32" else f"[N, {size}, {size}, 3]"
        too_many = len(shape) == 4 and shape[0] > max_images
        raise InputError(f"{datatype} input must have shape {expected} with N <= {max_images}, got {shape}",
                         413 if too_many else 422, "payload_too_large" if too_many else "bad_request")
    dtype = NUMPY[datatype]
    size_param = (spec.parameters or {}).get("binary_data_size")
    if size_param is not None:
        if (isinstance(size_param, bool) or not isinstance(size_param, int) or size_param != len(tail)
                or size_param != count * np.dtype(dtype).itemsize):
            raise InputError(f"binary_data_size {size_param!r} does not match shape {shape} ({datatype}) and the "
                             f"{len(tail)} bytes sent", 400)
        array = np.frombuffer(tail, dtype=dtype)
    else:
        array = json_numbers(spec.data, datatype)
        if array.size != count:
            raise InputError(f"input data has {array.size} values, shape {shape} needs {count}", 400)
    return array.reshape(shape), datatype


def json_numbers(data: Any, datatype: str) -> np.ndarray:
    """JSON ``data`` (flat or nested) as an array of ``datatype``; UINT8 takes whole numbers in [0, 255] only, so that
    1.5 is refused rather than truncated to 1."""
    try:
        values = np.asarray(data)
    except (TypeError, ValueError, OverflowError) as e:  # ragged nesting
        raise InputError(f"input data is not a list of {datatype} numbers ({e})", 400) from e
    if values.dtype.kind not in "iuf":  # strings, booleans, nulls, objects
        raise InputError(f"input data is not a list of {datatype} numbers (got {values.dtype.kind!r} values)", 400)
    if datatype == "UINT8":
        if not (np.isfinite(values).all() and (values == np.round(values)).all()
                and (values >= 0).all() and (values <= 255).all()):
            raise InputError("UINT8 input data must be whole numbers in [0, 255]", 400)
        return values.astype(np.uint8)
    with np.errstate(over="ignore"):  # too large for FP32: infinite, refused as such by from_tensor
        return values.astype(np.float32)


def infer_parameters(request: InferRequestIn, smoothing: SmoothingSpec, s: Settings) -> tuple[int, str, int | None]:
    params = request.parameters or {}
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


def infer_confidence(request: InferRequestIn) -> float | None:
    """The ``confidence`` parameter (sequential sampling), or None."""
    confidence = (request.parameters or {}).get("confidence")
    if confidence is None:
        return None
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0.5 < confidence < 1:
        raise InputError(f"parameter confidence must be a number in (0.5, 1), got {confidence!r}")
    return float(confidence)


def wants_binary(request: InferRequestIn, sequential: bool) -> dict[str, bool]:
    """Which outputs to return, and whether each is binary."""
    default = bool((request.parameters or {}).get("binary_data_output"))
    names: tuple[str, ...] = ("probabilities", "label", "vote_share")
    if sequential:
        names += ("samples_used", "decided")
    if not request.outputs:
        return dict.fromkeys(names, default)
    chosen: dict[str, bool] = {}
    for out in request.outputs:
        if out.name not in names:
            raise InputError(f"unknown output {out.name!r}; outputs are {', '.join(names)}", 400)
        chosen[out.name] = bool((out.parameters or {}).get("binary_data", default))
    return chosen


@dataclass(frozen=True)
class InferCall:
    """An infer request read and checked: everything the engine needs, and which outputs to send."""

    request: InferRequestIn
    images: torch.Tensor
    samples: int
    aggregation: str
    seed: int | None
    confidence: float | None
    outputs: dict[str, bool]


def read_infer(body: bytes, header_length: str | None, spec: ModelSpec, settings: Settings) -> InferCall:
    """The whole request side of ``infer``, without HTTP: any body either gives a checked
    :class:`InferCall` or raises :class:`InputError` (a 4xx), never anything else."""
    payload, tail = parse_infer(body, header_length)
    samples, aggregation, seed = infer_parameters(payload, spec.smoothing, settings)
    confidence = infer_confidence(payload)
    outputs = wants_binary(payload, confidence is not None)
    size = spec.architecture.input_size
    array, datatype = input_array(payload, tail, settings.max_images, size)
    check_count(array.shape[0], settings.max_images)
    images = from_tensor(array, datatype, size)
    return InferCall(payload, images, samples, aggregation, seed, confidence, outputs)


@router.post("/models/{name}/infer", openapi_extra=INFER_BODY, responses=ERRORS,
             dependencies=[Depends(require_access)])
async def infer(name: str, request: Request) -> Response:
    """Smoothed inference on a tensor batch; ``samples`` is a request parameter."""
    return await infer_version(name, VERSION, request)


@router.post("/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY, responses=ERRORS,
             dependencies=[Depends(require_access)])
async def infer_version(name: str, version: str, request: Request) -> Response:
    """Smoothed inference on a tensor batch; ``samples`` is a request parameter."""
    start = time.perf_counter()
    state, engine, manifest = serving(request)
    _model_or_404(state, name, version)
    settings = state.settings
    body = await read_body(request, settings.max_body_bytes)
    call = read_infer(body, request.headers.get(HEADER_LENGTH), manifest.spec, settings)
    samples, payload = call.samples, call.request
    if call.confidence is not None:
        work = predict_sequential(engine, call.images, samples, call.confidence, call.aggregation,  # type: ignore[arg-type]
                                  call.seed, settings.request_timeout_s, manifest.spec.architecture.num_classes)
    else:
        work = engine.predict(call.images, samples, call.aggregation, call.seed,  # type: ignore[arg-type]
                              timeout=settings.request_timeout_s)
    answers = await unless_client_leaves(request, work)
    state.metrics.prediction_duration.labels(samples_bucket(samples)).observe(time.perf_counter() - start)
    tensors = {
        "probabilities": np.array([a.prediction.probabilities for a in answers], dtype=np.float32),
        "label": np.array([a.prediction.label for a in answers], dtype=np.int64),
        "vote_share": np.array([a.prediction.vote_share for a in answers], dtype=np.float32),
        "samples_used": np.array([a.prediction.samples for a in answers], dtype=np.int64),
        "decided": np.array([bool(a.decided) for a in answers], dtype=np.bool_),
    }
    return encode_response(name, payload.id, tensors, call.outputs, samples)


def encode_response(name: str, request_id: Any, tensors: dict[str, np.ndarray], outputs: dict[str, bool],
                    samples: int) -> Response:
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.bool_): "BOOL"}
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
