"""What a running service holds, shared by the routers, and the errors they turn into HTTP answers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect

from models.checkpoint import Manifest
from service.auth import Access
from service.backends import Backend
from service.engine import Engine
from service.feedback import FeedbackStore, PredictionIds
from service.images import InputError
from service.metrics import Metrics
from service.remote_engine import FeedbackRouter, RemoteEngine, RemoteRuntime
from service.settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    manifest: Manifest | None = None
    backend: Backend | RemoteRuntime | None = None
    engine: Engine | RemoteEngine | None = None  # RemoteEngine: an HTTP worker of `siam serve --workers N`
    ids: PredictionIds | None = None  # issues the prediction ids of this process's answers
    feedback: FeedbackStore | RemoteEngine | FeedbackRouter | None = None  # which ids had feedback (maybe remote)
    links: list[RemoteEngine] = field(default_factory=list)  # a worker's connections, one per model process
    access: Access | None = None
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    restarting: bool = False  # --workers N: this worker's model process died and another is loading

    @property
    def model_name(self) -> str:
        return self.manifest.name if self.manifest else "none"


def state_of(request: Request) -> ServiceState:
    return request.app.state.siam  # type: ignore[no-any-return]


class ServiceUnavailableError(RuntimeError):
    """503 with a Retry-After header; ``kind`` labels the error counter."""

    def __init__(self, message: str, kind: str, retry_after_s: int = 1):
        super().__init__(message)
        self.kind = kind
        self.retry_after_s = retry_after_s


def serving(request: Request) -> tuple[ServiceState, Engine | RemoteEngine, Manifest]:
    """The state, engine and manifest of a service that can take predictions now (else 503)."""
    state = state_of(request)
    if state.draining:
        raise ServiceUnavailableError("the server is shutting down", "shutting_down", 5)
    if not state.ready or state.engine is None or state.manifest is None:
        raise ServiceUnavailableError(state.load_error or "the model is not loaded yet", "not_ready",
                                      1 if state.restarting else 5)
    return state, state.engine, state.manifest


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError(f"body of {declared} bytes is over the limit of {limit} bytes", 413, "payload_too_large")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise InputError(f"body is over the limit of {limit} bytes", 413, "payload_too_large")
            chunks.append(chunk)
    except ClientDisconnect as e:
        raise InputError("client disconnected while sending the body", 400) from e
    return b"".join(chunks)


T = TypeVar("T")


class ClientGoneError(ConnectionError):
    """The client closed the connection before its answer was ready."""


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it as soon as the client disconnects, so that the engine drops the
    request's rows instead of computing them for nobody. Call after the body has been read: the next
    ASGI message is then the disconnect. ``work`` runs in this handler's own task (one task fewer per
    request than awaiting it beside the watcher); the watcher cancels this task when the client goes."""
    handler = asyncio.current_task()
    assert handler is not None
    gone = False

    async def disconnected() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        handler.cancel()

    watcher = asyncio.ensure_future(disconnected())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:  # this handler itself was cancelled (server shutdown): not the client's doing
            raise
        handler.uncancel()
        raise ClientGoneError("client disconnected before the answer was ready") from None
    finally:
        watcher.cancel()
