"""An HTTP worker's connections to the model processes of ``siam serve --workers N``, re-made after a restart.

The supervisor (service/workers.py) restarts a model process that dies. Until the new one has loaded, a
worker whose own model process it was is not ready: its requests are answered 503 with Retry-After (those
that were waiting on the dead process too), and ``/health/ready`` says why. Once the new process has loaded,
the worker connects again and serves. A worker whose supervisor is gone (killed outright) has nobody to
restart anything: it drains and exits, as on SIGTERM, rather than wait for ever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.checkpoint import Manifest
from service.feedback import PredictionIds
from service.remote_engine import FeedbackRouter, RemoteEngine, RemoteRuntime, connect
from service.state import ServiceState

log = logging.getLogger("siam.worker")
RESTARTING = "the model process stopped; waiting for it to restart"
NOT_LOADED_RETRY_S = 1.0  # a restarted model process that could not load closes each connection at once


class ModelLinks:
    """One :class:`RemoteEngine` per model process, kept in ``state.links``; requests go to ``own``."""

    def __init__(self, state: ServiceState, paths: Sequence[Path], own: int = 0):
        self.state, self.paths, self.own = state, list(paths), own
        self.parent = os.getppid()
        self.relinking: set[asyncio.Task[None]] = set()

    def orphaned(self) -> bool:
        """The supervisor is gone (a child is re-parented when its parent dies): nobody restarts anything."""
        return os.getppid() != self.parent

    def stopped(self) -> bool:
        return self.state.draining or self.orphaned()

    async def open(self) -> None:
        """Connect to every model process; ready once all have loaded (else not ready, with their reason)."""
        state = self.state
        hellos: list[dict[str, Any]] = []
        for path in self.paths:
            try:
                reader, writer, hello = await connect(path, stop=self.stopped)
            except ConnectionAbortedError as e:  # told to stop (after the model process failed to load, say)
                hello = {"ready": False, "load_error": str(e)}
            else:
                if hello["ready"]:
                    state.links.append(self.engine(len(state.links), reader, writer, hello))
            if not hello["ready"]:
                state.load_error = hello["load_error"]
                for link in state.links:
                    link.close()
                state.links.clear()
                return
            hellos.append(hello)
        self.use(hellos[self.own])
        state.feedback = state.links[0] if len(state.links) == 1 else FeedbackRouter(state.links)
        state.metrics.prepare(state.model_name)
        state.ready = True

    def engine(self, k: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               hello: dict[str, Any]) -> RemoteEngine:
        name = hello["manifest"]["name"]
        return RemoteEngine(reader, writer, name, self.state.metrics, on_lost=lambda: self.lost(k))

    def use(self, hello: dict[str, Any]) -> None:
        """Serve with the model process that said ``hello``: its manifest, backend and engine."""
        state = self.state
        state.manifest = Manifest.model_validate(hello["manifest"])
        s = state.settings  # the supervisor's, secret included: ids this worker signs, any process reads
        state.ids = PredictionIds(s.feedback_secret.get_secret_value(), state.manifest.name, s.feedback_ttl_s)
        state.backend = RemoteRuntime(hello["backend"], hello["chunk_rows"], hello["runtime"])
        state.engine = state.links[self.own]

    def lost(self, k: int) -> None:
        """Model process ``k`` closed its connection: wait for its restart (or, orphaned, exit)."""
        if self.state.draining:
            return
        if self.orphaned():
            self.state.ready = False
            os.kill(os.getpid(), signal.SIGTERM)  # drain and exit, as on SIGTERM
            return
        if k == self.own:
            self.state.ready, self.state.load_error, self.state.restarting = False, RESTARTING, True
        task = asyncio.get_running_loop().create_task(self.relink(k), name=f"siam-relink-{k}")
        self.relinking.add(task)
        task.add_done_callback(self.relinking.discard)

    async def relink(self, k: int) -> None:
        """Connect to model process ``k`` again once its successor has loaded, and serve through it."""
        state = self.state
        while True:
            try:
                reader, writer, hello = await connect(self.paths[k], stop=self.stopped)
            except ConnectionAbortedError:
                if self.orphaned():
                    os.kill(os.getpid(), signal.SIGTERM)
                return
            except (asyncio.IncompleteReadError, ConnectionError):  # the successor died before its hello
                await asyncio.sleep(0.05)
                continue
            if hello["ready"]:
                break
            writer.close()
            if k == self.own:
                state.load_error = f"{RESTARTING}: {hello['load_error']}"
            await asyncio.sleep(NOT_LOADED_RETRY_S)
        old, state.links[k] = state.links[k], self.engine(k, reader, writer, hello)
        old.close()
        if len(state.links) == 1:
            state.feedback = state.links[0]
        if k == self.own:
            self.use(hello)
            state.ready, state.load_error, state.restarting = True, None, False
        log.warning("model process %d is back: serving again", k)
