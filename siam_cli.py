"""``siam``: one command line for the whole project.

Each subcommand lives in the module that does the work and is imported only when it runs, so
``siam --help`` is instant and serving never imports training code.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training.train", "adversarially train a CIFAR ResNet and write a checkpoint"),
    "evaluate": ("training.evaluate", "what m buys: robust, certified accuracy and repeatability vs m and sigma"),
    "compare": ("training.compare", "is one model more robust than another? paired on the same test images"),
    "export": ("training.export", "export a checkpoint to ONNX (noise in the graph) and check parity"),
    "serve": ("service.cli", "serve a checkpoint over HTTP (POST /predict?samples=N)"),
    "predict": ("service.client", "send image files or folders to a running service and print the answers"),
    "api-key": ("service.auth", "make an API key and the hash line for the file SIAM_API_KEYS names"),
    "bench": ("benchmarks.bench", "measure throughput: model limit, engine, HTTP, baselines"),
    "info": ("models.info", "print a checkpoint's manifest and verify its weights"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: siam <command> [options]", "", "Smoothed inference for adversarially-trained models.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'siam <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"siam: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[name][0])
    from models.checkpoint import CheckpointError

    try:
        module.main(rest)
    except (FileNotFoundError, CheckpointError) as e:  # a wrong path is the user's to fix: say so, no traceback
        print(f"siam {name}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
