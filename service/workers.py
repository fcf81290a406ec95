"""``siam serve --workers N``: N HTTP worker processes in front of one model process (or K of them).

One Python process parses, decodes and serialises every request of the single-process service while its
model thread computes; with a fast accelerator that process, not the model, sets the ceiling. Here the
HTTP side runs in N processes, each with its own listening socket on the one port (the kernel spreads
connections over them: :func:`listening_sockets`), and each sends its requests to the model process
(service/model_process.py), whose one engine batches the requests of all workers together. Prometheus
metrics are summed over the processes (prometheus-client's multiprocess mode). Prediction ids are signed
with the one feedback secret all the processes share (service/feedback.py), so feedback may reach any worker.

With ``--model-processes K`` there are K model processes on the one device, each with its own engine, and
worker i feeds model process i mod K: for hosts where one model process's Python (framing, queueing,
answering) caps the service below the model. (On the H200 measured, a second one did not raise the
ceiling: docs/speed.md.) Which ids had feedback is remembered by the model process that a hash of the id
names, whichever worker the feedback reaches (service/remote_engine.py).

On SIGTERM or SIGINT the workers drain first (each turns not-ready, finishes its accepted requests
within the grace period, as the single-process service does), then the model processes finish what they
still hold and exit. A process that dies is started again in its place: a worker on its own listening
socket, a model process on its own socket, which its workers connect to again once it has loaded
(service/model_links.py; meanwhile they answer 503 with Retry-After; the ids it answered still take
feedback, as its successor reads them with the same secret). ``siam_process_restarts_total`` counts the
restarts. Past :data:`RESTARTS_ALLOWED` restarts in :data:`RESTART_WINDOW_S` seconds, or when a model cannot
be loaded, the others are stopped and ``siam serve`` exits with status 1, for the orchestrator to restart it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

import uvicorn

from service.settings import Settings

log = logging.getLogger("siam.serve")
RESTARTS_ALLOWED = 5
RESTART_WINDOW_S = 60.0
"""More restarts than this within the window (all processes together) is a crash loop: stop and exit 1."""


def run_worker(settings: Settings, model_sockets: list[str], own: int, sockets: list[socket.socket],
               restarted: bool = False) -> None:
    """An HTTP worker's entry point: the ordinary app, sending its requests to model process ``own``."""
    from service.app import create_app
    from service.observe import setup_logging
    from service.server import GracefulServer, uvicorn_config

    setup_logging(settings.log_level)
    app = create_app(settings, model_sockets=[Path(path) for path in model_sockets], own=own)
    app.state.siam.metrics.count_start("http", restarted)
    GracefulServer(uvicorn_config(app, settings), app).run(sockets=sockets)


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on ``host:port``, one per worker, with ``SO_REUSEPORT``: the kernel gives
    each new connection to one of them by a hash of its addresses, so the workers get about equal shares.
    With one shared socket, whichever worker woke first accepted every connection waiting (asyncio accepts
    until none is left): 64 clients that connected at once went to 2 of 4 workers (docs/speed.md). A first
    socket, bound without ``SO_REUSEPORT`` and closed, fails the start when another program holds the port
    (which ``SO_REUSEPORT`` alone would let this one share) and picks the port when ``port`` is 0. Outside
    Linux, where ``SO_REUSEPORT`` does not spread connections, the workers share one socket."""
    probe = uvicorn.Config("service.app:create_app", host=host, port=port).bind_socket()
    if sys.platform != "linux":
        return [probe] * count
    family, address = probe.family, probe.getsockname()
    probe.close()
    sockets = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(2048)  # uvicorn's default backlog
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


def stop_process(process: BaseProcess, timeout: float) -> None:
    """Wait for ``process`` to end, killing it if it takes longer than ``timeout`` seconds."""
    process.join(timeout)
    if process.is_alive():
        log.error("process %s did not stop within %.0f s: killed", process.name, timeout)
        process.kill()
        process.join()


class RestartBudget:
    """At most ``allowed`` restarts within any ``window_s`` seconds: a process that keeps dying is not
    restarted for ever (a crash loop), and one that died an hour ago does not count against the next."""

    def __init__(self, allowed: int = RESTARTS_ALLOWED, window_s: float = RESTART_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic):
        self.allowed, self.window_s, self.clock = allowed, window_s, clock
        self.times: deque[float] = deque()

    def take(self) -> bool:
        """Spend one restart now; False when the window's restarts are spent."""
        now = self.clock()
        while self.times and self.times[0] <= now - self.window_s:
            self.times.popleft()
        if len(self.times) >= self.allowed:
            return False
        self.times.append(now)
        return True


class Supervisor:
    """Starts the model processes and the workers, watches them, restarts one that dies, stops them in order."""

    def __init__(self, settings: Settings, folder: Path, signalled: list[int], budget: RestartBudget | None = None):
        self.settings, self.signalled = settings, signalled
        self.budget = budget or RestartBudget()
        self.model_sockets = [str(folder / f"model-{k}.sock") for k in range(settings.model_processes)]
        self.ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no threads or CUDA state forked
        self.models: list[BaseProcess] = []
        self.controls: list[Connection] = []
        self.closed: set[Connection] = set()  # control pipes at EOF: the model process is exiting
        self.workers: list[BaseProcess] = []
        self.listeners: list[socket.socket] = []

    def start(self) -> None:
        s = self.settings
        # Bound first: a port in use fails the start before any process is made.
        self.listeners = listening_sockets(s.host, s.port, s.workers)
        for k in range(s.model_processes):
            model, control = self.model_process(k)
            self.models.append(model)
            self.controls.append(control)
        self.workers = [self.worker(i) for i in range(s.workers)]
        log.info("model process %s, %d HTTP workers (%s) on %s:%d", ", ".join(str(m.pid) for m in self.models),
                 len(self.workers), ", ".join(str(w.pid) for w in self.workers), s.host,
                 self.listeners[0].getsockname()[1])

    def model_process(self, k: int, restarted: bool = False) -> tuple[BaseProcess, Connection]:
        """Start model process ``k`` on its socket; returns it and its control pipe."""
        from service.model_process import run_model_process

        s = self.settings
        control, model_end = self.ctx.Pipe()
        name = "siam-model" if s.model_processes == 1 else f"siam-model-{k}"
        model = self.ctx.Process(target=run_model_process, args=(s, self.model_sockets[k], model_end, k, restarted),
                                 name=name)
        model.start()
        model_end.close()
        return model, control

    def worker(self, i: int, restarted: bool = False) -> BaseProcess:
        """Start worker ``i`` on its listening socket. Worker i sends its requests to model process i mod K:
        each model process batches its workers' requests."""
        s = self.settings
        worker = self.ctx.Process(target=run_worker, name=f"siam-http-{i}",
                                  args=(s, self.model_sockets, i % s.model_processes, [self.listeners[i]], restarted))
        worker.start()
        return worker

    def restart(self, dead: BaseProcess) -> str | None:
        """Start ``dead`` again in its place; a message instead when the restart budget is spent."""
        from prometheus_client import multiprocess

        what = f"{dead.name} exited with status {dead.exitcode}"
        if not self.budget.take():
            return (f"siam serve: {what}; {self.budget.allowed} restarts within {self.budget.window_s:g} s "
                    "already: giving up")
        multiprocess.mark_process_dead(dead.pid)  # its live gauges (in flight, queue length) no longer count
        if dead in self.models:
            k = self.models.index(dead)
            self.closed.discard(self.controls[k])
            self.controls[k].close()
            self.models[k], self.controls[k] = self.model_process(k, restarted=True)
            log.error("%s: restarted as process %d", what, self.models[k].pid)
        else:
            i = self.workers.index(dead)
            self.workers[i] = self.worker(i, restarted=True)
            log.error("%s: restarted as process %d", what, self.workers[i].pid)
        return None

    def watch(self) -> str | None:
        """Until a signal (None) or a failure (its message): a model that did not load, or a process that
        died once the restart budget is spent."""
        while not self.signalled:
            watched: list[object] = [*(c for c in self.controls if c not in self.closed),
                                     *(m.sentinel for m in self.models), *(w.sentinel for w in self.workers)]
            ready = wait(watched, timeout=0.5)  # type: ignore[arg-type]
            for control in (c for c in self.controls if c in ready):
                try:
                    kind, detail = control.recv()
                except EOFError:  # the model process is exiting: its sentinel says how
                    self.closed.add(control)
                    continue
                if kind == "load_error":
                    log.error("could not load %s: %s", self.settings.checkpoint, detail)
                    if self.settings.exit_on_load_error:
                        return f"siam serve: could not load {self.settings.checkpoint}: {detail}"
            dead = [p for p in (*self.models, *self.workers) if p.sentinel in ready and not p.is_alive()]
            # A signal to the whole process group (Ctrl-C) reaches the workers too: they drain and exit
            # by themselves, which is the shutdown asked for, not a failure.
            for process in dead:
                if self.signalled:
                    break
                failure = self.restart(process)
                if failure is not None:
                    return failure
        log.info("signal %d: draining the workers, then the model process", self.signalled[0])
        return None

    def stop(self) -> None:
        """The workers first (each finishes its accepted requests), then the model processes."""
        from prometheus_client import multiprocess

        grace = self.settings.graceful_timeout_s + 5
        for worker in self.workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)  # type: ignore[arg-type]
        for worker in self.workers:
            stop_process(worker, grace)
            multiprocess.mark_process_dead(worker.pid)
        for control in self.controls:
            with contextlib.suppress(OSError):  # the model process may be gone already
                control.send(("stop", None))
        for model in self.models:
            stop_process(model, grace)
        for listener in self.listeners:
            listener.close()


def serve_workers(settings: Settings) -> int | str:
    """Run the model process and the workers until a signal (status 0) or a failure (a message, status 1)."""
    if settings.model_processes > settings.workers:
        return (f"siam serve: --model-processes {settings.model_processes} needs at least as many --workers "
                f"(each model process is fed by its own workers); got --workers {settings.workers}")
    if settings.rate_limit_per_s > 0:
        return ("siam serve: --rate-limit-per-s counts per process, so N workers would allow N times the rate; "
                "run one worker, or rate-limit at the proxy in front")
    signalled: list[int] = []

    def on_signal(sig: int, frame: FrameType | None) -> None:
        signalled.append(sig)

    # Before any child starts: a signal must never leave children behind without their supervisor.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    multiprocessing.allow_connection_pickling()  # the listening socket goes to each worker
    with tempfile.TemporaryDirectory(prefix="siam-") as folder:
        metrics_folder = Path(folder, "metrics")
        metrics_folder.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_folder)  # read by the children at import
        supervisor = Supervisor(settings, Path(folder), signalled)
        try:
            supervisor.start()
            failure = supervisor.watch()
        finally:
            supervisor.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for model in supervisor.models:
        if failure is None and model.exitcode not in (0, None):
            failure = f"siam serve: {model.name} exited with status {model.exitcode}"
    return failure or 0
