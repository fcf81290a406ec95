"""The native API: predict, feedback, model listing, health. Thin: parsing here, work in the engine."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import torch
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from service.auth import require_access
from service.engine import Answer
from service.images import InputError, check_count, decode_base64, decode_image, to_batch
from service.metrics import samples_bucket
from service.schemas import (
    ErrorOut,
    FeedbackIn,
    FeedbackOut,
    PredictionOut,
    PredictionsOut,
    PredictParams,
    PredictRequest,
)
from service.sequential import predict_sequential
from service.state import ServiceState, read_body, serving, state_of, unless_client_leaves

router = APIRouter()

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text} for code, text in {
        400: "undecodable body or image", 401: "missing or unknown API key (when the server has keys)",
        403: "seed not allowed", 413: "body, image or image count over the limit",
        415: "unsupported content type", 422: "invalid parameter or image",
        429: "rate limit exceeded (Retry-After)",
        503: "queue full, deadline cannot be met, shutting down or not ready (Retry-After)",
        504: "deadline passed"}.items()
}
# Bodies at least this large are parsed and decoded on a worker thread, so that the event loop keeps
# answering (health checks included) while a big request is decoded. A single 32x32 image is decoded
# on the loop: tens of microseconds, less than the hand-off to a thread would cost.
OFF_LOOP_BYTES = 16 * 1024

PREDICT_OPENAPI = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": PredictRequest.model_json_schema()},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
}},
    # The query parameters, as FastAPI would document them (see read_params for why it does not parse them).
    "parameters": [
        {"name": name, "in": "query", "required": False, "description": schema.get("description", ""),
         "schema": schema}
        for name, schema in PredictParams.model_json_schema()["properties"].items()
    ]}


def decode_request(body: bytes, content_type: str, state: ServiceState) -> tuple[torch.Tensor, bool]:
    """JSON with base64 images, or raw image bytes, to ``[N, 3, H, W]`` floats in [0, 1]; and whether the
    client sent a list (``images``), so it gets a list back even for one image."""
    settings, size = state.settings, state.manifest.spec.architecture.input_size  # type: ignore[union-attr]
    media = content_type.split(";")[0].strip().lower()
    if not body:
        raise InputError("empty body: send JSON {\"image\": <base64>} or raw PNG/JPEG bytes", 400)
    if media == "application/json":
        try:
            request = PredictRequest.model_validate_json(body)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
            raise InputError(f"invalid JSON body: {problems}", 422 if body.strip().startswith(b"{") else 400) from e
        encoded = request.encoded()
        check_count(len(encoded), settings.max_images)
        images = [decode_image(decode_base64(text, i), size, settings.allow_resize, i, settings.max_image_pixels)
                  for i, text in enumerate(encoded)]
        return to_batch(images), request.images is not None
    if media.startswith("image/"):
        return to_batch([decode_image(body, size, settings.allow_resize, 0, settings.max_image_pixels)]), False
    raise InputError(f"content type {media or '(none)'!r} is not supported; send application/json or image/png, "
                     "image/jpeg", 415, "unsupported_media_type")


def read_params(request: Request) -> PredictParams:
    """The query parameters, validated as one pydantic model in one call. Declared as six FastAPI
    parameters they cost about 120 us a request in FastAPI's dependency solver on the 2-core CPU this was
    measured on, a sixth of an m = 1 forward (docs/speed.md); refusals are the 422s FastAPI would give."""
    try:
        return PredictParams.model_validate(dict(request.query_params))
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("query", *err["loc"])} for err in e.errors()]) from e


def check_samples(samples: int | None, default: int, limit: int) -> int:
    m = default if samples is None else samples
    if not 1 <= m <= limit:
        raise InputError(f"samples must be between 1 and {limit}, got {m}")
    return m


def prediction_id(state: ServiceState, label: int, samples: int) -> str:
    """A signed id that carries the answer, for ``POST /feedback`` through any process (service/feedback.py);
    an abstention has nothing to be right or wrong about, so its id is random and takes no feedback."""
    return state.ids.issue(label, samples) if state.ids is not None and label >= 0 else uuid.uuid4().hex


def to_out(answer: Answer, state: ServiceState, aggregation: str, elapsed_ms: float, samples: int) -> PredictionOut:
    p, c, label = answer.prediction, answer.certificate, answer.label
    names = state.manifest.spec.class_names  # type: ignore[union-attr]
    sequential = answer.decided is not None
    return PredictionOut(
        id=prediction_id(state, label, samples), label=label, class_name=names[label] if label >= 0 else None,
        probabilities=p.probabilities, vote_share=p.vote_share, samples=samples, model=state.model_name,
        latency_ms=round(elapsed_ms, 3), aggregation=aggregation,
        abstained=None if c is None else c.abstained, radius=None if c is None else c.radius,
        p_lower=None if c is None else c.p_lower,
        samples_used=p.samples if sequential else None, decided=answer.decided)


@router.post("/predict", response_model=PredictionOut | PredictionsOut, response_model_exclude_none=True,
             responses=ERRORS, openapi_extra=PREDICT_OPENAPI, tags=["predict"], dependencies=[Depends(require_access)])
async def predict(request: Request) -> Response:
    """The smoothed prediction for one image or several, each over ``samples`` noisy copies batched with
    every other waiting request.

    The body is either raw PNG/JPEG bytes (`Content-Type: image/png` or `image/jpeg`) or JSON with exactly
    one of `image` (one base64 image: one answer) or `images` (a list: a list of answers, in order).
    Images must be 8-bit RGB at the model's input size (unless the server resizes)."""
    start = time.perf_counter()
    params = read_params(request)
    samples, aggregation, certify, alpha, seed, confidence = (
        params.samples, params.aggregation, params.certify, params.alpha, params.seed, params.confidence)
    state, engine, manifest = serving(request)
    settings, smoothing = state.settings, manifest.spec.smoothing
    m = check_samples(samples, smoothing.default_samples, settings.max_samples)
    if confidence is not None and certify:
        raise InputError("certify and confidence cannot be combined: CERTIFY needs its fixed number of copies")
    if seed is not None and not settings.allow_seed:
        raise InputError("seed is disabled on this server: fixed noise makes the model deterministic, and so "
                         "attackable (SIAM_ALLOW_SEED=true enables it)", 403)
    body = await read_body(request, settings.max_body_bytes)
    content_type = request.headers.get("content-type", "")
    if len(body) >= OFF_LOOP_BYTES:
        images, as_list = await asyncio.to_thread(decode_request, body, content_type, state)
    else:
        images, as_list = decode_request(body, content_type, state)
    rule = aggregation or smoothing.aggregation
    if confidence is not None:
        work = predict_sequential(engine, images, m, confidence, rule, seed, settings.request_timeout_s,
                                  len(manifest.spec.class_names))
    else:
        work = engine.predict(images, m, rule, seed, alpha if certify else None, settings.certify_selection_samples,
                              settings.request_timeout_s)
    answers = await unless_client_leaves(request, work)
    elapsed_ms = (time.perf_counter() - start) * 1000
    state.metrics.prediction_duration.labels(samples_bucket(m)).observe(elapsed_ms / 1000)
    outs = [to_out(a, state, rule, elapsed_ms, m) for a in answers]
    body = PredictionsOut(predictions=outs) if as_list else outs[0]
    # Already validated when built: serialise once here rather than have FastAPI validate it again.
    return Response(body.model_dump_json(exclude_none=True), media_type="application/json")


@router.post("/feedback", response_model=FeedbackOut, tags=["monitoring"], dependencies=[Depends(require_access)],
             responses={code: ERRORS[code] for code in (400, 401, 422, 429)} | {
                 404: {"model": ErrorOut, "description": "unknown, expired or already answered prediction id"}})
async def feedback(body: FeedbackIn, request: Request) -> FeedbackOut | JSONResponse:
    """Report the true label of an earlier prediction; feeds the live-accuracy counters."""
    state = state_of(request)
    classes = len(state.manifest.spec.class_names) if state.manifest else None
    if classes is not None and body.label >= classes:
        raise InputError(f"label must be a class index in [0, {classes}), got {body.label}")
    issued = await state.feedback.recall(body.id) if state.feedback is not None else None
    if issued is None:
        state.metrics.errors.labels("feedback_unknown_id").inc()
        return JSONResponse({"detail": f"prediction id {body.id!r} is unknown, expired, or already has feedback"},
                            status_code=404)
    correct = issued.label == body.label
    bucket = samples_bucket(issued.samples)
    state.metrics.feedback.labels(issued.model, bucket).inc()
    if correct:
        state.metrics.feedback_correct.labels(issued.model, bucket).inc()
    return FeedbackOut(id=body.id, correct=correct)


@router.get("/v1/models", tags=["models"], dependencies=[Depends(require_access)],
            responses={code: ERRORS[code] for code in (401, 429)})
async def models(request: Request) -> dict[str, Any]:
    """What is loaded: the checkpoint's manifest (smoothing settings included) and how it runs."""
    state = state_of(request)
    if state.manifest is None or state.backend is None:
        return {"models": [], "load_error": state.load_error}
    s = state.settings
    return {"models": [{
        "name": state.manifest.name, "sha256": state.manifest.weights.sha256,
        "spec": state.manifest.spec.model_dump(mode="json"), "runtime": state.backend.describe(),
        "chunk_rows": state.backend.chunk_rows, "ready": state.ready,
        "limits": {"max_samples": s.max_samples, "max_images": s.max_images, "max_body_bytes": s.max_body_bytes,
                   "max_batch_rows": s.max_batch_rows, "allow_seed": s.allow_seed, "allow_resize": s.allow_resize},
    }]}


@router.get("/health/live", tags=["health"])
async def live() -> dict[str, str]:
    """The process answers."""
    return {"status": "live"}


@router.get("/health/ready", tags=["health"], responses={503: {"model": ErrorOut}})
async def ready(request: Request) -> JSONResponse:
    """Ready once the model is loaded and warmed up; not ready while shutting down."""
    state = state_of(request)
    if state.ready and not state.draining:
        return JSONResponse({"status": "ready", "model": state.model_name})
    reason = "shutting down" if state.draining else state.load_error or "loading"
    return JSONResponse({"status": "not ready", "detail": reason}, status_code=503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    text, media_type = state_of(request).metrics.exposition()
    return Response(text, media_type=media_type)
