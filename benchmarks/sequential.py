"""Sequential sampling against the fixed budget, through the service's engine, side by side in one run.

The backend and engine are built as ``siam serve`` builds them. ``--clients`` closed-loop callers each
send one clean JPEG test image at a time (cycling through ``--images`` of them) with ``samples =
--budget``: once answered with every copy (fixed), once with ``confidence = --confidence`` (sequential:
rounds of 16 doubling, stopping when the vote is decided). The two modes alternate for ``--rounds``
rounds of ``--requests`` images per client, so a drift in the machine hits both alike; reported:
predictions per second of each (best round, every caller run to its end), their ratio, and the mean
copies the sequential answers used. No HTTP.

    python -m benchmarks.sequential checkpoints/resnet20-pgd7 --budget 256 --clients 64 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine_bench import build_backend
from benchmarks.machine import describe, summary_line
from service.engine import Engine
from service.metrics import Metrics
from service.sequential import predict_sequential
from service.settings import DEFAULT_ONNX_CACHE
from training.data import add_data_arguments, load_split, to_float


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sequential", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    add_data_arguments(p)
    p.add_argument("--images", type=int, default=256, help="clean test images the callers cycle through")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--confidence", type=float, default=0.999)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=2, help="images each client sends per round (default: %(default)s)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None, help="JSON file for the results (default: print only)")
    return p


async def closed_loop(engine: Engine, images: torch.Tensor, budget: int, confidence: float | None, clients: int,
                      requests: int, classes: int) -> tuple[float, float]:
    """``clients`` callers send ``requests`` images each, one at a time; predictions per second over the
    whole run (every caller finishes, so a slow mode is not cut off mid-batch), and the mean copies used."""
    done, copies, cursor = 0, 0, 0

    async def caller() -> None:
        nonlocal done, copies, cursor
        for _ in range(requests):
            image = images[cursor % len(images)].unsqueeze(0)
            cursor += 1
            if confidence is None:
                answers = await engine.predict(image, budget, "softmax", timeout=3600)
            else:
                answers = await predict_sequential(engine, image, budget, confidence, "softmax", None, 3600, classes)
            done += 1
            copies += answers[0].prediction.samples

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(clients)))
    return done / (time.perf_counter() - start), copies / max(done, 1)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    backend, settings, name, sigma = build_backend(Path(args.checkpoint), args.backend, args.device,
                                                   args.threads or torch.get_num_threads(), DEFAULT_ONNX_CACHE)
    test = load_split(args.data, "test", args.cache_dir).subset(args.images, seed=0)
    images = to_float(test.images)
    classes = len(test.classes)
    engine = Engine(backend, name, sigma, Metrics(), settings.max_batch_rows, 0.0, 100_000)
    engine.start()
    rounds: dict[str, list[tuple[float, float]]] = {"fixed": [], "sequential": []}
    try:
        await closed_loop(engine, images, args.budget, None, min(args.clients, 4), 1, classes)  # warm-up
        for _ in range(args.rounds):
            rounds["fixed"].append(await closed_loop(engine, images, args.budget, None, args.clients,
                                                     args.requests, classes))
            rounds["sequential"].append(await closed_loop(engine, images, args.budget, args.confidence,
                                                          args.clients, args.requests, classes))
    finally:
        await engine.stop()
    best = {mode: max(r[0] for r in rs) for mode, rs in rounds.items()}
    return {
        "command": "python -m benchmarks.sequential " + shlex.join(sys.argv[1:]),
        "model": name, "machine": describe(torch.device(args.device)), "backend": backend.describe(),
        "budget": args.budget, "confidence": args.confidence, "clients": args.clients,
        "predictions_per_s": best, "ratio": best["sequential"] / best["fixed"],
        "mean_copies_used": {mode: sum(r[1] for r in rs) / len(rs) for mode, rs in rounds.items()},
        "rounds": {mode: [{"predictions_per_s": r[0], "mean_copies": r[1]} for r in rs] for mode, rs in rounds.items()},
    }


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = asyncio.run(run(args))
    print(f"{result['command']}\n{summary_line(result['machine'])}; backend {result['backend'].get('backend')} "
          f"({result['backend'].get('provider', result['backend'].get('device'))})")
    print(f"budget {result['budget']}, {result['clients']} clients: fixed {result['predictions_per_s']['fixed']:.1f} "
          f"predictions/s, sequential {result['predictions_per_s']['sequential']:.1f} predictions/s "
          f"(**{result['ratio']:.2f}x**), sequential answers used "
          f"{result['mean_copies_used']['sequential']:.1f} copies on average")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
