"""Helpers shared by the service tests: encoded images and a real uvicorn server in a subprocess."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.servers import ROOT, ServerProcess, SystemSpec, free_port

__all__ = ["ROOT", "Server", "b64", "free_port", "image_bytes"]


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


class Server(ServerProcess):
    """``siam serve`` in a subprocess on a free port, with one thread; ``with Server(...)`` waits for readiness.
    The start, readiness check and stop are the benchmarks' (:class:`benchmarks.servers.ServerProcess`)."""

    def __init__(self, checkpoint: Path, *flags: str, env: dict[str, str] | None = None):
        args = ["service.cli", str(checkpoint), "--port", "{port}", "--threads", "1", "--log-level", "warning",
                *flags]
        super().__init__(SystemSpec("siam-test", args, "/health/ready", "query"), ready_timeout_s=90.0, env=env)
