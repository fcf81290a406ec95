"""siam serve: run the service under uvicorn, with graceful shutdown on SIGTERM.

Every flag is a field of service/settings.py, also settable as the environment variable SIAM_<NAME>;
a flag given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import sys

from service.app import create_app
from service.observe import setup_logging
from service.server import GracefulServer, uvicorn_config
from service.settings import Settings
from service.workers import serve_workers


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


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    overrides = {k: v for k, v in args.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except Exception as e:  # pydantic's message names the bad setting
        sys.exit(f"siam serve: invalid settings: {e}")
    setup_logging(settings.log_level)
    if (settings.ssl_certfile is None) != (settings.ssl_keyfile is None):
        sys.exit("siam serve: HTTPS needs both --ssl-certfile and --ssl-keyfile")
    if settings.workers > 1 or settings.model_processes > 1:
        sys.exit(serve_workers(settings))
    app = create_app(settings)
    server = GracefulServer(uvicorn_config(app, settings), app)
    server.run()
    if app.state.siam.load_error and settings.exit_on_load_error:
        sys.exit(f"siam serve: could not load {settings.checkpoint}: {app.state.siam.load_error}")


if __name__ == "__main__":
    main()
