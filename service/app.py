"""The FastAPI application: start-up (load, warm up, tune), error handling, routers.

``create_app(settings)`` builds an app that tests can drive through httpx without a server; the
lifespan loads the checkpoint in a thread so ``/health/live`` answers while the model loads.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from models.checkpoint import CheckpointError, Manifest
from service import api, kserve
from service.auth import SECURITY_SCHEMES, Access, read_key_hashes, require_access
from service.backends import Backend, load_backend, remembered_chunk_rows
from service.canary import run_canary_forever
from service.engine import DeadlineExceededError, Engine, OverloadedError, QueueFullError, ShuttingDownError
from service.feedback import FeedbackStore, FeedbackUnavailableError, PredictionIds
from service.images import InputError
from service.model_links import ModelLinks
from service.observe import ObserveMiddleware
from service.remote_engine import ModelLostError
from service.settings import Settings
from service.state import ClientGoneError, ServiceState, ServiceUnavailableError

log = logging.getLogger("siam.app")


def warm_up(backend: Backend, manifest: Manifest, tune_cache: Path | None) -> float:
    """Run the model before reporting ready, so the first request does not pay for lazy start-up; with
    ``tune_cache`` (``SIAM_CHUNK_ROWS=auto``) pick the chunk size measured for this model and machine.

    Returns the seconds per noisy row, timed on two chunks: it prices the queue for deadline-aware
    admission until the engine's own batches refine it."""
    size, samples = manifest.spec.architecture.input_size, manifest.spec.smoothing.default_samples
    if tune_cache is not None:
        chosen = remembered_chunk_rows(backend, size, manifest.weights.sha256, tune_cache)
        log.info("chunk_rows %d", chosen)
    backend.logits(torch.rand(2, 3, size, size), [samples, 1], [None, None])
    rows = 2 * backend.chunk_rows
    start = time.perf_counter()
    backend.logits(torch.rand(1, 3, size, size), [rows], [None])
    return (time.perf_counter() - start) / rows


def without_paths(message: str, checkpoint: Path) -> str:
    """A load error as clients may see it: the checkpoint by its folder name, no file-system paths
    (the log keeps the full message for the operator)."""
    for form in sorted({str(checkpoint.resolve()), str(checkpoint.absolute()), str(checkpoint)}, key=len,
                       reverse=True):
        message = message.replace(form, checkpoint.name)
    return re.sub(r"(?<![\w.])/(?:[\w.-]+/)+", "", message)  # any other absolute path: keep the file name


def build_access(settings: Settings) -> Access | None:
    """API keys and rate limit, when either is configured (a bad keys file fails the start)."""
    hashes = read_key_hashes(settings.api_keys) if settings.api_keys is not None else None
    if hashes is None and settings.rate_limit_per_s == 0:
        return None
    return Access(hashes, settings.rate_limit_per_s, settings.rate_limit_burst)


async def start(state: ServiceState) -> None:
    """Load, warm up and start the engine (and the canary); failures leave the service not ready."""
    s = state.settings
    try:
        state.access = build_access(s)
        backend, manifest = await asyncio.to_thread(load_backend, s)
        row_cost = None
        if s.warmup:
            row_cost = await asyncio.to_thread(warm_up, backend, manifest,
                                               s.tuning_cache if s.chunk_rows == "auto" else None)
        ids = PredictionIds(s.feedback_secret.get_secret_value(), manifest.name, s.feedback_ttl_s)
        feedback = FeedbackStore(ids, s.feedback_capacity, s.feedback_db)
    except (CheckpointError, RuntimeError, OSError, ValueError) as e:
        log.error("could not load %s: %s: %s", s.checkpoint, type(e).__name__, e)
        state.load_error = without_paths(f"{type(e).__name__}: {e}", s.checkpoint)
        return
    engine = Engine(backend, manifest.name, manifest.spec.smoothing.sigma, state.metrics,
                    s.max_batch_rows, s.max_wait_ms, s.max_queue)
    engine.row_cost_s = row_cost
    engine.start()
    state.backend, state.manifest, state.engine = backend, manifest, engine
    state.ids, state.feedback = ids, feedback
    info = {k: str(v) for k, v in backend.describe().items() if k in ("backend", "device", "precision", "provider")}
    state.metrics.prepare(manifest.name)
    state.metrics.describe_model({"name": manifest.name, "checksum": manifest.weights.sha256, **info})
    state.ready = True
    log.info("ready", extra={"fields": {"model": manifest.name, "chunk_rows": backend.chunk_rows, **info}})


async def start_worker(state: ServiceState, model_sockets: Sequence[Path], own: int = 0) -> None:
    """An HTTP worker of ``siam serve --workers N``: connect to the model processes, which load the model,
    batch, and remember which prediction ids had feedback; ready once they have loaded
    (service/model_process.py), and again after one is restarted (service/model_links.py). Its requests go to
    model process ``own``; feedback to the process :func:`service.remote_engine.owner` names."""
    state.access = build_access(state.settings)
    await ModelLinks(state, model_sockets, own).open()


def create_app(settings: Settings | None = None, model_sockets: Sequence[Path] | None = None,
               own: int = 0) -> FastAPI:
    """The service; with ``model_sockets``, an HTTP worker that sends its requests to model process ``own``."""
    state = ServiceState(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if model_sockets is None:
            await start(state)
        else:
            await start_worker(state, model_sockets, own)
        canary = None
        if state.ready and state.settings.canary_interval_s > 0 and model_sockets is None:  # else the model process's
            canary = asyncio.create_task(run_canary_forever(state), name="siam-canary")
        yield
        state.draining = True
        if canary:
            canary.cancel()
        for link in state.links:  # a worker's links to the other model processes (feedback)
            if link is not state.engine:
                await link.stop()
        if state.engine:
            await state.engine.stop()
        if isinstance(state.feedback, FeedbackStore):
            state.feedback.close()

    app = FastAPI(title="siam: smoothed inference for adversarially-trained models", version="1",
                  lifespan=lifespan, description="POST /predict?samples=N answers with the aggregate of the model "
                  "over N noisy copies of each image, batched with every other waiting request.")
    app.state.siam = state
    routers = (api.router, kserve.router)
    for router in routers:
        app.include_router(router)
    app.add_middleware(ObserveMiddleware, metrics=state.metrics)
    install_error_handlers(app, state)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document, plus the KServe request models (those routes read the raw body) and the
        API-key schemes of the routes that check them (``require_access`` reads the headers itself)."""
        if app.openapi_schema is None:
            document = generate()
            components = document.setdefault("components", {})
            components.setdefault("schemas", {}).update(kserve.openapi_schemas())
            components["securitySchemes"] = SECURITY_SCHEMES
            for route in (route for router in routers for route in router.routes):
                if isinstance(route, APIRoute) and any(d.dependency is require_access for d in route.dependencies):
                    for method in route.methods:
                        document["paths"][route.path_format][method.lower()]["security"] = [
                            {name: []} for name in SECURITY_SCHEMES]
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def error_body(request: Request, message: str | list[dict[str, object]]) -> dict[str, object]:
    """KServe v2 answers ``{"error": ...}``; the native API ``{"detail": ...}`` like FastAPI."""
    return {"error": message} if request.url.path.startswith("/v2/") else {"detail": message}


def install_error_handlers(app: FastAPI, state: ServiceState) -> None:
    def answer(request: Request, status: int, kind: str, message: str,
               headers: dict[str, str] | None = None, retry_after_s: float | None = None) -> JSONResponse:
        state.metrics.errors.labels(kind).inc()
        body = error_body(request, message)
        if retry_after_s is not None:
            body["retry_after_s"] = retry_after_s
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(InputError)
    async def input_error(request: Request, e: InputError) -> JSONResponse:
        return answer(request, e.status, e.kind, str(e), getattr(e, "headers", None), getattr(e, "retry_after_s", None))

    @app.exception_handler(ClientGoneError)
    async def client_gone(request: Request, e: ClientGoneError) -> JSONResponse:
        return answer(request, 499, "client_disconnected", str(e))  # nobody reads it: for the log and metrics

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{' '.join(map(str, err['loc']))}: {err['msg']}"
                             + (f" (got {err['input']!r})" if "input" in err and err["input"] is not None else "")
                             for err in e.errors())
        return answer(request, 422, "bad_request", problems)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, e: QueueFullError) -> JSONResponse:
        return answer(request, 503, "queue_full", f"server busy: {e}; retry later", {"Retry-After": "1"})

    @app.exception_handler(OverloadedError)
    async def overloaded(request: Request, e: OverloadedError) -> JSONResponse:
        return answer(request, 503, "overloaded", f"server busy: {e}; retry later",
                      {"Retry-After": str(e.retry_after_s)})

    @app.exception_handler(ServiceUnavailableError)
    async def unavailable(request: Request, e: ServiceUnavailableError) -> JSONResponse:
        return answer(request, 503, e.kind, str(e), {"Retry-After": str(e.retry_after_s)})

    @app.exception_handler(ModelLostError)
    async def model_lost(request: Request, e: ModelLostError) -> JSONResponse:
        # --workers N: the supervisor is starting another model process (about 2 s on 2 CPU cores)
        return answer(request, 503, "not_ready", f"{e}; it is being restarted", {"Retry-After": "1"})

    @app.exception_handler(ShuttingDownError)
    async def shutting_down(request: Request, e: ShuttingDownError) -> JSONResponse:
        return answer(request, 503, "shutting_down", str(e), {"Retry-After": "5"})

    @app.exception_handler(FeedbackUnavailableError)
    async def feedback_unavailable(request: Request, e: FeedbackUnavailableError) -> JSONResponse:
        # not counted: the client may send the same feedback again
        return answer(request, 503, "feedback_unavailable", f"{e}; retry later", {"Retry-After": "1"})

    @app.exception_handler(DeadlineExceededError)
    async def deadline(request: Request, e: DeadlineExceededError) -> JSONResponse:
        return answer(request, 504, "deadline", f"deadline exceeded: {e}")

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        # uvicorn closes the connection after an unhandled error: say so, so pooled clients do not reuse it
        return answer(request, 500, "internal", f"internal error: {type(e).__name__}", {"Connection": "close"})
