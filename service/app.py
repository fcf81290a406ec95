"""The FastAPI application: start-up (load, warm up, tune), error handling, routers.

``create_app(settings)`` builds an app that tests can drive through httpx without a server; the
lifespan loads the checkpoint in a thread so ``/health/live`` answers while the model loads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from models.checkpoint import CheckpointError
from service import api, kserve
from service.backends import Backend, load_backend, tune_chunk_rows
from service.canary import run_canary_forever
from service.engine import DeadlineExceededError, Engine, QueueFullError, ShuttingDownError
from service.feedback import FeedbackStore
from service.images import InputError
from service.observe import ObserveMiddleware
from service.settings import Settings
from service.state import ServiceState, ServiceUnavailableError

log = logging.getLogger("siam.app")


def warm_up(backend: Backend, size: int, samples: int, tune: bool) -> None:
    """Run the model before reporting ready, so the first request does not pay for lazy start-up."""
    if tune:
        chosen = tune_chunk_rows(backend, size)
        log.info("chunk_rows tuned to %d", chosen)
    backend.logits(torch.rand(2, 3, size, size), [samples, 1], [None, None])


async def start(state: ServiceState) -> None:
    """Load, warm up and start the engine (and the canary); failures leave the service not ready."""
    s = state.settings
    try:
        backend, manifest = await asyncio.to_thread(load_backend, s)
        if s.warmup:
            await asyncio.to_thread(warm_up, backend, manifest.spec.architecture.input_size,
                                    manifest.spec.smoothing.default_samples, s.chunk_rows == "auto")
    except (CheckpointError, RuntimeError, OSError) as e:
        state.load_error = f"{type(e).__name__}: {e}"
        log.error("could not load %s: %s", s.checkpoint, state.load_error)
        return
    engine = Engine(backend, manifest.name, manifest.spec.smoothing.sigma, state.metrics,
                    s.max_batch_rows, s.max_wait_ms, s.max_queue)
    engine.start()
    state.backend, state.manifest, state.engine = backend, manifest, engine
    state.feedback = FeedbackStore(s.feedback_capacity, s.feedback_ttl_s)
    info = {k: str(v) for k, v in backend.describe().items() if k in ("backend", "device", "precision", "provider")}
    state.metrics.prepare(manifest.name)
    state.metrics.model.info({"name": manifest.name, "checksum": manifest.weights.sha256, **info})
    state.ready = True
    log.info("ready", extra={"fields": {"model": manifest.name, "chunk_rows": backend.chunk_rows, **info}})


def create_app(settings: Settings | None = None) -> FastAPI:
    state = ServiceState(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await start(state)
        canary = None
        if state.ready and state.settings.canary_interval_s > 0:
            canary = asyncio.create_task(run_canary_forever(state), name="siam-canary")
        yield
        state.draining = True
        if canary:
            canary.cancel()
        if state.engine:
            await state.engine.stop()

    app = FastAPI(title="siam: smoothed inference for adversarially-trained models", version="1",
                  lifespan=lifespan, description="POST /predict?samples=N answers with the aggregate of the model "
                  "over N noisy copies of each image, batched with every other waiting request.")
    app.state.siam = state
    app.include_router(api.router)
    app.include_router(kserve.router)
    app.add_middleware(ObserveMiddleware, metrics=state.metrics)
    install_error_handlers(app, state)
    return app


def error_body(request: Request, message: str | list[dict[str, object]]) -> dict[str, object]:
    """KServe v2 answers ``{"error": ...}``; the native API ``{"detail": ...}`` like FastAPI."""
    return {"error": message} if request.url.path.startswith("/v2/") else {"detail": message}


def install_error_handlers(app: FastAPI, state: ServiceState) -> None:
    def answer(request: Request, status: int, kind: str, message: str,
               headers: dict[str, str] | None = None) -> JSONResponse:
        state.metrics.errors.labels(kind).inc()
        return JSONResponse(error_body(request, message), status_code=status, headers=headers)

    @app.exception_handler(InputError)
    async def input_error(request: Request, e: InputError) -> JSONResponse:
        return answer(request, e.status, e.kind, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{' '.join(map(str, err['loc']))}: {err['msg']}"
                             + (f" (got {err['input']!r})" if "input" in err and err["input"] is not None else "")
                             for err in e.errors())
        return answer(request, 422, "bad_request", problems)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, e: QueueFullError) -> JSONResponse:
        return answer(request, 503, "queue_full", f"server busy: {e}; retry later", {"Retry-After": "1"})

    @app.exception_handler(ServiceUnavailableError)
    async def unavailable(request: Request, e: ServiceUnavailableError) -> JSONResponse:
        return answer(request, 503, e.kind, str(e), {"Retry-After": str(e.retry_after_s)})

    @app.exception_handler(ShuttingDownError)
    async def shutting_down(request: Request, e: ShuttingDownError) -> JSONResponse:
        return answer(request, 503, "shutting_down", str(e), {"Retry-After": "5"})

    @app.exception_handler(DeadlineExceededError)
    async def deadline(request: Request, e: DeadlineExceededError) -> JSONResponse:
        return answer(request, 504, "deadline", f"deadline exceeded: {e}")

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return answer(request, 500, "internal", f"internal error: {type(e).__name__}")
