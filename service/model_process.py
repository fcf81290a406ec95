"""The model process of ``siam serve --workers N``: one engine that every HTTP worker feeds.

It loads the checkpoint exactly as the single-process service does (``service.app.start``), then answers
the workers' frames (service/wire.py) on a Unix socket. Requests from all workers join the one engine
queue, so they batch together as the requests of one process do. The process ignores SIGINT and SIGTERM:
the supervisor stops it, after the workers have drained, by closing its control pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from service.app import start
from service.canary import run_canary_forever
from service.engine import Engine
from service.feedback import FeedbackStore
from service.observe import setup_logging
from service.settings import Settings
from service.state import ServiceState
from service.wire import encode_answers, encode_error, frame, read_frame, tensor_bytes, tensor_from

log = logging.getLogger("siam.model")
DRAIN_AT_BYTES = 1 << 20  # wait for the socket to take a worker's answers once this many are buffered


def hello(state: ServiceState) -> dict[str, Any]:
    """What a worker needs to answer on its own: the manifest, how the model runs, or why it did not load."""
    if state.manifest is None or state.backend is None:
        return {"ready": False, "load_error": state.load_error or "not loaded"}
    return {"ready": True, "manifest": state.manifest.model_dump(mode="json"), "runtime": state.backend.describe(),
            "backend": state.backend.name, "chunk_rows": state.backend.chunk_rows}


class WorkerLink:
    """One worker's connection: each request runs as its own task, so one worker's requests batch together."""

    def __init__(self, state: ServiceState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.state, self.reader, self.writer = state, reader, writer
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.drain_lock = asyncio.Lock()

    async def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.writer.write(frame(header, payload))
        if self.writer.transport.get_write_buffer_size() > DRAIN_AT_BYTES:
            async with self.drain_lock:
                await self.writer.drain()

    async def serve(self) -> None:
        try:
            while True:
                header, payload = await read_frame(self.reader)
                op, rid = header["op"], header["id"]
                if op == "cancel":
                    task = self.tasks.get(rid)
                    if task is not None:
                        task.cancel()
                elif op in ("predict", "logits", "recall"):
                    work = self.run(header, payload) if op != "recall" else self.recall(rid, header["prediction"])
                    task = asyncio.create_task(work)
                    self.tasks[rid] = task
                    task.add_done_callback(lambda _, rid=rid: self.tasks.pop(rid, None))
                else:
                    raise ValueError(f"unknown operation {op!r}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker exited
        except Exception:  # a frame this code did not write: drop the connection, say why
            log.exception("bad frame from a worker; closing its connection")
        finally:
            for task in list(self.tasks.values()):
                task.cancel()  # nobody is left to read these answers: the engine drops their rows
            self.writer.close()

    async def recall(self, rid: int, prediction_id: str) -> None:
        """Feedback's once-only check, as its own task: with SIAM_FEEDBACK_DB it may wait on the file's lock."""
        store = self.state.feedback
        try:
            issued = await store.recall(prediction_id) if store is not None else None
        except Exception as e:  # the file could not be written: the worker answers 503
            await self.send({"id": rid, **encode_error(e)})
            return
        await self.send({"id": rid, "issued": None if issued is None else
                         [issued.label, issued.samples, issued.model, issued.at]})

    async def run(self, header: dict[str, Any], payload: bytes) -> None:
        engine = self.state.engine
        assert isinstance(engine, Engine)
        rid, images = header["id"], tensor_from(header["shape"], payload)
        try:
            if header["op"] == "logits":
                logits = await engine.copy_logits(images, header["samples"], header["seed"], header["timeout"],
                                                  header["admit"])
                shape, data = tensor_bytes(torch.stack(logits))
                await self.send({"id": rid, "shape": shape}, data)
                return
            answers = await engine.predict(images, header["samples"], header["aggregation"], header["seed"],
                                           header["alpha"], header["selection"], header["timeout"], header["internal"])
            await self.send({"id": rid, "answers": encode_answers(answers)})
        except Exception as e:  # the engine's refusals and model failures go back to the worker to answer
            await self.send({"id": rid, **encode_error(e)})


async def serve_model(settings: Settings, socket_path: Path, control: Connection,
                      state: ServiceState | None = None, index: int = 0, restarted: bool = False) -> int:
    """Load the model, answer workers until the control pipe closes, drain the engine. Returns the exit status.
    ``state`` (a fresh one by default) lets in-process tests look at the engine; ``index`` is this process's
    place among ``--model-processes`` (only the first runs the canary); ``restarted``: it replaces one that died."""
    state = state or ServiceState(settings)
    state.metrics.count_start("model", restarted)
    loaded = asyncio.Event()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await loaded.wait()
        connection = WorkerLink(state, reader, writer)
        await connection.send(hello(state))
        if state.engine is not None:
            await connection.serve()
        else:
            writer.close()

    server = await asyncio.start_unix_server(on_connect, path=str(socket_path))
    await start(state)
    loaded.set()
    if state.load_error is not None:
        control.send(("load_error", state.load_error))
        if settings.exit_on_load_error:
            server.close()
            return 1
    else:
        control.send(("ready", None))
    canary = None
    if state.engine is not None and settings.canary_interval_s > 0 and index == 0:
        canary = asyncio.create_task(run_canary_forever(state), name="siam-canary")
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()

    def watch() -> None:  # any message, or the supervisor gone (EOF): stop
        with contextlib.suppress(EOFError, OSError):
            control.recv()
        loop.call_soon_threadsafe(stopped.set)

    threading.Thread(target=watch, name="siam-control", daemon=True).start()
    await stopped.wait()
    state.draining = True
    if canary is not None:
        canary.cancel()
    server.close()
    if state.engine is not None:
        await state.engine.stop()
    if isinstance(state.feedback, FeedbackStore):
        state.feedback.close()
    return 0


def run_model_process(settings: Settings, socket_path: str, control: Connection, index: int = 0,
                      restarted: bool = False) -> None:
    """The process's entry point (spawned by service/workers.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the supervisor decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(settings.log_level)
    log.info("model process %d (%d of %d)", os.getpid(), index + 1, settings.model_processes)
    sys.exit(asyncio.run(serve_model(settings, Path(socket_path), control, index=index, restarted=restarted)))
