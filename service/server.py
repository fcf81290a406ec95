"""uvicorn as siam runs it: graceful shutdown that turns not-ready at once and answers late requests 503."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn
from fastapi import FastAPI

from service.settings import Settings

log = logging.getLogger("siam.serve")


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False, log_config=None,
                          timeout_graceful_shutdown=max(1, round(settings.graceful_timeout_s)), lifespan="on",
                          ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile)


class GracefulServer(uvicorn.Server):
    """On SIGTERM/SIGINT, turn not-ready and refuse new predictions at once, then let uvicorn finish the
    requests already accepted (up to ``graceful_timeout_s``) before the lifespan stops the engine."""

    def __init__(self, config: uvicorn.Config, app: Any):
        super().__init__(config)
        self.siam_app = app

    async def startup(self, sockets: Any = None) -> None:
        """A checkpoint that cannot load ends the process (unless told to stay up, not ready)."""
        await super().startup(sockets)
        state = self.siam_app.state.siam
        if state.load_error and state.settings.exit_on_load_error:
            self.should_exit = True

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.siam_app.state.siam.draining = True
        log.info("signal %d: draining", sig)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: Any = None) -> None:
        """uvicorn cancels the requests still running when the grace period ends, and a cancelled request
        answers 500. Shortly before that, the engine answers every unfinished one 503 with Retry-After."""
        state = self.siam_app.state.siam
        grace = float(self.config.timeout_graceful_shutdown or state.settings.graceful_timeout_s)
        margin = min(max(0.5, 0.1 * grace), grace / 2)

        async def shed_late() -> None:
            await asyncio.sleep(grace - margin)
            if state.engine is not None:
                shed = state.engine.shed()
                log.warning("grace period ending: %d unfinished requests answered 503", shed)

        shedder = asyncio.create_task(shed_late())
        try:
            await super().shutdown(sockets)
        finally:
            shedder.cancel()
