"""The systems under load: the service and the two baselines, each a server process on a free port.

All get the same checkpoint, device and thread count. Each runs in its own process group so that
pausing or stopping it reaches the worker processes it spawned (LitServe has several); its output goes
to a log file, never a pipe that could fill up and stall it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.report import CEILING
from service.settings import DEFAULT_ONNX_CACHE

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SystemSpec:
    """How to start one system and talk to it."""

    name: str
    args: list[str]  # after ``python -m``; ``{port}`` is filled in
    health_path: str
    body_style: str  # where the load generator puts ``samples``: query or json
    config: dict[str, object] = field(default_factory=dict)  # what the results should say about it


def service_spec(checkpoint: Path, threads: int, backend: str, device: str, onnx_cache: Path,
                 name: str = "siam", workers: int = 1, model_processes: int = 1,
                 cuda_graphs: str = "auto") -> SystemSpec:
    """``siam serve`` as shipped: chunk size tuned at start-up (``auto``), default batching settings;
    ``workers`` > 1: that many HTTP worker processes in front of ``model_processes`` model processes."""
    args = ["service.cli", str(checkpoint), "--port", "{port}", "--threads", str(threads), "--backend", backend,
            "--device", device, "--log-level", "warning", "--onnx-cache", str(onnx_cache), "--workers", str(workers),
            "--model-processes", str(model_processes), "--cuda-graphs", cuda_graphs]
    return SystemSpec(name, args, "/health/ready", "query",
                      {"backend": backend, "chunk_rows": "auto", "http_workers": workers,
                       "model_processes": model_processes, "cuda_graphs": cuda_graphs})


def fastapi_spec(checkpoint: Path, threads: int, device: str, mode: str = "sync", backend: str = "torch",
                 onnx_cache: Path = DEFAULT_ONNX_CACHE) -> SystemSpec:
    """The plain FastAPI service; ``fastapi`` on PyTorch, ``fastapi-onnx`` on the service's ONNX graph."""
    args = ["benchmarks.baselines.plain_fastapi", str(checkpoint), "--port", "{port}", "--threads", str(threads),
            "--device", device, "--mode", mode, "--backend", backend, "--onnx-cache", str(onnx_cache)]
    name = "fastapi" if backend == "torch" else f"fastapi-{backend}"
    return SystemSpec(name, args, "/health", "query", {"backend": backend, "mode": mode})


def instant_spec() -> SystemSpec:
    """The load generator's ceiling: a server that answers every request at once (no model)."""
    return SystemSpec(CEILING, ["benchmarks.baselines.instant_server", "--port", "{port}"], "/health", "query",
                      {"what": "an instant fixed answer: the most the load generator can measure here"})


def litserve_spec(checkpoint: Path, threads: int, device: str, max_batch_size: int,
                  batch_timeout: float) -> SystemSpec:
    args = ["benchmarks.baselines.litserve_server", str(checkpoint), "--port", "{port}", "--threads", str(threads),
            "--device", device, "--max-batch-size", str(max_batch_size), "--batch-timeout", str(batch_timeout)]
    return SystemSpec("litserve", args, "/health", "json",
                      {"backend": "torch", "max_batch_size": max_batch_size, "batch_timeout_s": batch_timeout})


class ServerProcess:
    """One running system; ``with ServerProcess(spec) as s:`` waits until it answers its health check."""

    def __init__(self, spec: SystemSpec, ready_timeout_s: float = 180.0, env: dict[str, str] | None = None,
                 poll_s: float = 0.25, cwd: Path = ROOT):
        """``cwd``: the checkout whose code runs (another one to compare two versions)."""
        self.spec = spec
        self.poll_s = poll_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.predict_url = f"{self.url}/predict"
        self.ready_timeout_s = ready_timeout_s
        fd, name = tempfile.mkstemp(prefix=f"siam-bench-{spec.name}-", suffix=".log")
        self.log = Path(name)
        self.startup_s = 0.0
        args = [a.replace("{port}", str(self.port)) for a in spec.args]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, stdout=fd, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
        os.close(fd)  # the child has its own copy

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(self.url + self.spec.health_path, timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - self.started
                    return
            except httpx.TransportError:
                pass
            time.sleep(self.poll_s)
        raise TimeoutError(f"{self.spec.name} not ready after {self.ready_timeout_s:.0f} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def pause(self) -> None:
        """SIGSTOP the whole process group: an idle server must not take CPU from the one being measured
        (LitServe's workers poll their queues even when idle)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL if it has not gone after 15 s."""
        if self.proc.poll() is None:
            try:
                self.resume()
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        with_children_gone(self.proc.pid)
        self.log.unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except Exception:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def with_children_gone(pgid: int) -> None:
    """Kill what is left of the process group (workers whose parent died first)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def model_info(server: ServerProcess) -> dict[str, object]:
    """What the service says it runs (backend, provider, tuned chunk size); empty for the baselines."""
    try:
        models = httpx.get(server.url + "/v1/models", timeout=5).json().get("models", [])
    except (httpx.HTTPError, ValueError):
        return {}
    if not models:
        return {}
    runtime = models[0].get("runtime", {})
    return {"runtime": runtime, "chunk_rows": models[0].get("chunk_rows")}
