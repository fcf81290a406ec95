"""The batching engine's own cost per request: the engine alone with a model that costs nothing.

A backend that returns zero logits at once stands in for the model, so what is left is the engine's
Python: queueing, batching, the hand-off to the model thread, aggregation, answering. That is the
ceiling of a service whose model is fast (a GPU): ``concurrency`` closed-loop callers, one image each.

    python -m benchmarks.engine_overhead --samples 1,16 --callers 64
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine_bench import closed_loop
from benchmarks.machine import describe, save_results, summary_line
from service.engine import Engine
from service.metrics import Metrics


class InstantBackend:
    """Zero logits for every copy, at once: a model that costs nothing."""

    name, precision, device = "instant", "fp32", torch.device("cpu")

    def __init__(self, chunk_rows: int = 4096, classes: int = 10):
        self.chunk_rows, self.classes = chunk_rows, classes

    def logits(self, images: torch.Tensor, samples: Sequence[int], seeds: Sequence[int | None]) -> torch.Tensor:
        return torch.zeros(sum(samples), self.classes)

    def describe(self) -> dict[str, object]:
        return {"backend": self.name}


async def measure(samples: int, callers: int, duration_s: float) -> float:
    """Predictions per second of ``callers`` closed-loop callers at ``samples`` copies each."""
    engine = Engine(InstantBackend(), "instant", 0.1, Metrics(), max_batch_rows=4096, max_wait_ms=0, max_queue=4096)
    engine.start()
    try:
        return (await closed_loop(engine, samples, callers, duration_s, warmup_s=0.5)).predictions_per_s
    finally:
        await engine.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", default="1,16", help="m of every caller, comma-separated (default: %(default)s)")
    p.add_argument("--callers", type=int, default=64, help="closed-loop callers (default: %(default)s)")
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per run (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="runs per m; the median is reported (default: %(default)s)")
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    command = "python -m benchmarks.engine_overhead " + shlex.join(argv)
    info = describe(torch.device("cpu"))
    print(f"{command}\nmachine: {summary_line(info)}", flush=True)
    table = []
    for m in (int(s) for s in args.samples.split(",")):
        runs = [asyncio.run(measure(m, args.callers, args.duration)) for _ in range(args.rounds)]
        rate = statistics.median(runs)
        table.append({"samples": m, "callers": args.callers, "predictions_per_s": rate, "runs": runs,
                      "us_per_request": 1e6 / rate})
        print(f"  m = {m}, {args.callers} callers: {rate:,.0f} predictions/s ({1e6 / rate:.0f} us per request; "
              f"runs {', '.join(f'{r:,.0f}' for r in runs)})", flush=True)
    results = {"command": command, "machine": info, "table": table}
    save_results(results, args.output)
    return results


if __name__ == "__main__":
    main()
