"""What one ``POST /predict`` costs inside the service, without a network: the whole ASGI app (middleware,
routing, parameter parsing, image decoding, the engine and its model thread, the answer) called
in-process on one PNG, one request at a time. The median per request, after a warm-up; ``--profile``
adds a cProfile listing (its own overhead inflates every figure, so read it for shares, not times).

Compare two checkouts by running it in each; the model's own share is ``python -m benchmarks.latency``.

    python -m benchmarks.asgi_overhead checkpoints/resnet20-pgd7 --samples 1 --requests 3000
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.load import png_image
from benchmarks.machine import describe, summary_line
from service.app import create_app
from service.settings import DEFAULT_CHECKPOINT, Settings


def scope_for(body: bytes, samples: int) -> dict[str, object]:
    """An HTTP/1.1 ``POST /predict?samples=m`` with a raw PNG body, as uvicorn would hand it over."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/predict", "raw_path": b"/predict", "query_string": f"samples={samples}".encode(),
            "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
            "headers": [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode()),
                        (b"host", b"bench")]}


async def one_request(app: object, scope: dict[str, object], body: bytes) -> None:
    """One request through the app; the client stays connected until the answer is sent."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    answered = asyncio.Event()
    status: list[int] = []

    async def receive() -> dict[str, object]:
        if messages:
            return messages.pop()
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            status.append(int(message["status"]))  # type: ignore[call-overload]

    await app(dict(scope), receive, send)  # type: ignore[operator]
    answered.set()
    if status != [200]:
        raise RuntimeError(f"/predict answered {status}")


async def measure(args: argparse.Namespace) -> tuple[list[float], float]:
    """Each measured request's wall time, and the event loop's CPU seconds per request (``thread_time``
    of this thread: the HTTP side's own cost, without the model thread's, and steadier than wall time)."""
    app = create_app(Settings(checkpoint=args.checkpoint, threads=args.threads, backend=args.backend,
                              device="cpu", log_level="warning"))
    body, scope = png_image(0), scope_for(png_image(0), args.samples)
    async with app.router.lifespan_context(app):
        for _ in range(args.warmup):
            await one_request(app, scope, body)
        times = []
        cpu_start = time.thread_time()
        for _ in range(args.requests):
            start = time.perf_counter()
            await one_request(app, scope, body)
            times.append(time.perf_counter() - start)
        loop_cpu = (time.thread_time() - cpu_start) / args.requests
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(min(args.requests, 1000)):
                await one_request(app, scope, body)
            profile.disable()
            pstats.Stats(profile).sort_stats("cumulative").print_stats(args.profile)
    return times, loop_cpu


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.asgi_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, nargs="?", default=DEFAULT_CHECKPOINT)
    p.add_argument("--samples", type=int, default=1, help="m of every request [1]")
    p.add_argument("--requests", type=int, default=3000, help="measured requests [3000]")
    p.add_argument("--warmup", type=int, default=300, help="requests before measuring [300]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model [all cores]")
    p.add_argument("--backend", default="auto", help="auto, onnx or torch [auto]")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile (cProfile) and print its N most expensive calls by cumulative time")
    args = p.parse_args(argv)
    print("command: python -m benchmarks.asgi_overhead " + shlex.join(sys.argv[1:] if argv is None else argv))
    print("machine: " + summary_line(describe(torch.device("cpu"))))
    times, loop_cpu = asyncio.run(measure(args))
    times.sort()
    print(f"/predict?samples={args.samples} in-process, {len(times)} requests: median "
          f"{statistics.median(times) * 1e6:.0f} us, p90 {times[int(0.9 * len(times))] * 1e6:.0f} us; "
          f"event loop CPU {loop_cpu * 1e6:.0f} us a request")


if __name__ == "__main__":
    main()
