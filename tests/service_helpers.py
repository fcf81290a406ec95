"""Helpers shared by the service tests: encoded images, a real uvicorn server in a subprocess, and a
feedback file held locked by another connection."""

from __future__ import annotations

import base64
import contextlib
import io
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.servers import ROOT, ServerProcess, SystemSpec, free_port
from service.feedback import FeedbackStore, TakenInFile

__all__ = ["ROOT", "Server", "b64", "free_port", "image_bytes", "locked_feedback_file"]


def image_bytes(seed: int = 0, size: int = 32, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    img = Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@contextlib.contextmanager
def locked_feedback_file(store: FeedbackStore, path: Path, busy_timeout_s: float, model: str = "tiny"
                         ) -> Iterator[None]:
    """``store`` writing to the feedback file at ``path`` while another connection holds it locked (as a
    stuck replica would): the store is given its own connection that waits ``busy_timeout_s`` for the lock
    (not the service's 5 s), and keeps it after the lock is released on leaving."""
    assert isinstance(store.taken, TakenInFile), "the store must have been made with a feedback file"
    store.taken.close()
    store.taken = TakenInFile(path, model, busy_timeout_s=busy_timeout_s)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        yield
        holder.execute("ROLLBACK")
    finally:
        holder.close()


class Server(ServerProcess):
    """``siam serve`` in a subprocess on a free port, with one thread; ``with Server(...)`` waits for readiness.
    The start, readiness check and stop are the benchmarks' (:class:`benchmarks.servers.ServerProcess`)."""

    def __init__(self, checkpoint: Path, *flags: str, env: dict[str, str] | None = None):
        args = ["service.cli", str(checkpoint), "--port", "{port}", "--threads", "1", "--log-level", "warning",
                *flags]
        super().__init__(SystemSpec("siam-test", args, "/health/ready", "query"), ready_timeout_s=90.0, env=env)


@contextlib.contextmanager
def started_together(*servers: Server) -> Iterator[tuple[Server, ...]]:
    """Servers already launched (each starts in its constructor), waited for together: their start-ups, mostly
    imports, overlap on the cores instead of adding up. Every one is stopped at the end, whichever failed."""
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.callback(server.stop)
        for server in servers:
            server.wait_ready()
        yield servers
