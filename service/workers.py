"""``siam serve --workers N``: N HTTP worker processes in front of one model process.

One Python process parses, decodes and serialises every request of the single-process service while its
model thread computes; with a fast accelerator that process, not the model, sets the ceiling. Here the
HTTP side runs in N processes sharing the listening socket (the kernel spreads connections over them),
and each sends its requests to the model process (service/model_process.py), whose one engine batches
the requests of all workers together. Prometheus metrics are summed over the processes
(prometheus-client's multiprocess mode), and the feedback store lives in the model process.

On SIGTERM or SIGINT the workers drain first (each turns not-ready, finishes its accepted requests
within the grace period, as the single-process service does), then the model process finishes what it
still holds and exits. If any process dies, the others are stopped and ``siam serve`` exits with status
1, for the orchestrator to restart it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
from multiprocessing.connection import wait
from pathlib import Path
from types import FrameType

import uvicorn

from service.settings import Settings

log = logging.getLogger("siam.serve")


def run_worker(settings: Settings, model_socket: str, sockets: list[socket.socket]) -> None:
    """An HTTP worker's entry point: the ordinary app, sending its requests to the model process."""
    from service.app import create_app
    from service.observe import setup_logging
    from service.server import GracefulServer, uvicorn_config

    setup_logging(settings.log_level)
    app = create_app(settings, model_socket=Path(model_socket))
    GracefulServer(uvicorn_config(app, settings), app).run(sockets=sockets)


def stop_process(process: multiprocessing.process.BaseProcess, timeout: float) -> None:
    """Wait for ``process`` to end, killing it if it takes longer than ``timeout`` seconds."""
    process.join(timeout)
    if process.is_alive():
        log.error("process %s did not stop within %.0f s: killed", process.name, timeout)
        process.kill()
        process.join()


def serve_workers(settings: Settings) -> int | str:
    """Run the model process and the workers until a signal (status 0) or a failure (a message, status 1)."""
    if settings.rate_limit_per_s > 0:
        return ("siam serve: --rate-limit-per-s counts per process, so N workers would allow N times the rate; "
                "run one worker, or rate-limit at the proxy in front")
    from prometheus_client import multiprocess

    from service.model_process import run_model_process

    multiprocessing.allow_connection_pickling()  # the listening socket goes to each worker
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no threads or CUDA state forked
    with tempfile.TemporaryDirectory(prefix="siam-") as folder:
        metrics_folder = Path(folder, "metrics")
        metrics_folder.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_folder)  # read by the children at import
        model_socket = str(Path(folder, "model.sock"))
        control, model_end = ctx.Pipe()
        model = ctx.Process(target=run_model_process, args=(settings, model_socket, model_end), name="siam-model")
        model.start()
        model_end.close()
        listener = uvicorn.Config("service.app:create_app", host=settings.host, port=settings.port).bind_socket()
        workers = [ctx.Process(target=run_worker, args=(settings, model_socket, [listener]), name=f"siam-http-{i}")
                   for i in range(settings.workers)]
        for worker in workers:
            worker.start()
        log.info("model process %d, %d HTTP workers on %s:%d", model.pid, len(workers), settings.host,
                 listener.getsockname()[1])

        signalled: list[int] = []

        def on_signal(sig: int, frame: FrameType | None) -> None:
            signalled.append(sig)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        failure: str | None = None
        try:
            while not signalled and failure is None:
                ready = wait([control, model.sentinel, *(w.sentinel for w in workers)], timeout=0.5)
                if control in ready:
                    try:
                        kind, detail = control.recv()
                    except EOFError:
                        kind, detail = "gone", None
                    if kind == "load_error":
                        log.error("could not load %s: %s", settings.checkpoint, detail)
                        if settings.exit_on_load_error:
                            failure = f"siam serve: could not load {settings.checkpoint}: {detail}"
                    elif kind == "ready":
                        log.info("model process ready")
                dead = [p for p in (model, *workers) if p.sentinel in ready and not p.is_alive()]
                if dead and failure is None:
                    failure = "siam serve: " + ", ".join(f"{p.name} exited with status {p.exitcode}" for p in dead)
            if signalled:
                log.info("signal %d: draining the workers, then the model process", signalled[0])
            grace = settings.graceful_timeout_s + 5
            for worker in workers:
                if worker.is_alive():
                    os.kill(worker.pid, signal.SIGTERM)  # type: ignore[arg-type]
            for worker in workers:
                stop_process(worker, grace)
                multiprocess.mark_process_dead(worker.pid)
            with contextlib.suppress(OSError):  # the model process may be gone already
                control.send(("stop", None))
            stop_process(model, grace)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            listener.close()
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        if failure is None and model.exitcode not in (0, None):
            failure = f"siam serve: the model process exited with status {model.exitcode}"
        return failure or 0
