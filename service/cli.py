"""siam serve: run the service under uvicorn, with graceful shutdown on SIGTERM.

Every flag is a field of service/settings.py, also settable as the environment variable SIAM_<NAME>;
a flag given on the command line wins over the environment. One setting has no flag, so that it stays
out of the process list: SIAM_FEEDBACK_SECRET (16 characters or more) signs the prediction ids; replicas
given the same one take POST /feedback for each other's predictions (unset: a random one per start).
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from service.app import create_app
from service.observe import setup_logging
from service.server import GracefulServer, uvicorn_config
from service.settings import Settings
from service.workers import serve_workers

SECRETS = ("feedback_secret",)  # environment only, never a flag (the process list shows flags), never echoed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="siam serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Settings.model_fields["checkpoint"].default
    p.add_argument("checkpoint", nargs="?", default=None,
                   help=f"checkpoint folder [env SIAM_CHECKPOINT; default {default}]")
    for name, field in Settings.model_fields.items():
        if name == "checkpoint" or name in SECRETS:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or name} [env SIAM_{name.upper()}; default {field.default}]"
        if field.annotation is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, dest=name, default=None, help=help_text)
    return p


def describe_invalid(error: ValidationError, given: set[str]) -> str:
    """One line per bad setting, named as the user set it (flag or environment variable), with what was given.

    pydantic's own text names the field only, with a link, which leaves the user to guess where it came from.
    """
    lines = []
    for err in error.errors():
        name = str(err["loc"][0]) if err["loc"] else "settings"
        flag = "the checkpoint argument" if name == "checkpoint" else f"--{name.replace('_', '-')}"
        where = flag if name in given else f"SIAM_{name.upper()}"
        shown = "(not shown: a secret)" if name in SECRETS else f"(given: {err.get('input')!r})"
        lines.append(f"  {where}: {err['msg']} {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    overrides = {k: v for k, v in args.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        sys.exit("siam serve: invalid settings:\n" + describe_invalid(e, set(overrides)))
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
