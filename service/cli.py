"""siam serve: run the service under uvicorn, with graceful shutdown on SIGTERM.

Every flag is a field of service/settings.py, also settable as the environment variable SIAM_<NAME>;
a flag given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import uvicorn

from service.app import create_app
from service.observe import setup_logging
from service.settings import Settings

log = logging.getLogger("siam.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="siam serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Settings.model_fields["checkpoint"].default
    p.add_argument("checkpoint", nargs="?", default=None,
                   help=f"checkpoint folder [env SIAM_CHECKPOINT; default {default}]")
    for name, field in Settings.model_fields.items():
        if name == "checkpoint":
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or name} [env SIAM_{name.upper()}; default {field.default}]"
        if field.annotation is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, dest=name, default=None, help=help_text)
    return p


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


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    overrides = {k: v for k, v in args.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except Exception as e:  # pydantic's message names the bad setting
        sys.exit(f"siam serve: invalid settings: {e}")
    setup_logging(settings.log_level)
    app = create_app(settings)
    if (settings.ssl_certfile is None) != (settings.ssl_keyfile is None):
        sys.exit("siam serve: HTTPS needs both --ssl-certfile and --ssl-keyfile")
    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False, log_config=None,
                            timeout_graceful_shutdown=max(1, round(settings.graceful_timeout_s)), lifespan="on",
                            ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile)
    server = GracefulServer(config, app)
    server.run()
    if app.state.siam.load_error and settings.exit_on_load_error:
        sys.exit(f"siam serve: could not load {settings.checkpoint}: {app.state.siam.load_error}")


if __name__ == "__main__":
    main()
