"""The model process's own ceiling (``siam serve --workers N``): requests through its socket, no model.

The model process's server (``service/model_process.WorkerLink``) runs in this process over an engine
whose backend answers zero logits at once; ``--clients`` processes, each a worker's ``RemoteEngine`` with
``--callers`` closed-loop callers of one image, send it requests through its Unix socket. What is left
is the hop (framing, JSON, a task per request, prediction ids) and the engine's Python: if this is far
above what the whole service answers, the HTTP workers, not the model process, are the bound.

    python -m benchmarks.model_process_overhead --clients 4 --callers 16 --samples 1,16
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import queue
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.engine_overhead import InstantBackend
from benchmarks.machine import describe, save_results, summary_line
from service.engine import Engine
from service.feedback import FeedbackStore
from service.metrics import Metrics
from service.model_process import WorkerLink
from service.remote_engine import RemoteEngine, connect
from service.settings import Settings
from service.state import ServiceState

READY_TIMEOUT_S = 120.0  # a cold machine's spawned interpreters import torch before their first request


def client(path: str, callers: int, samples: int, duration_s: float, ready: Any, go: Any, start_at: Any,
           counts: Any) -> None:
    """One worker: connects, warms up and says ``ready``; once told to ``go``, runs ``callers`` closed-loop
    callers and puts how many answers arrived in the ``duration_s`` from ``start_at``."""

    async def run() -> int:
        reader, writer, _ = await connect(Path(path))
        remote = RemoteEngine(reader, writer, "instant", Metrics())
        image = torch.rand(1, 3, 32, 32)
        await remote.predict(image, samples, "softmax")
        # A fixed head start is not enough: a spawned interpreter importing torch took over 3 s in CI.
        ready.put(True)
        if not await asyncio.to_thread(go.wait, READY_TIMEOUT_S + 10):
            raise RuntimeError("never told to go")
        start = start_at.value
        end = start + duration_s
        done = 0

        async def caller() -> None:
            nonlocal done
            while time.time() < end:
                await remote.predict(image, samples, "softmax")
                done += start <= time.time() <= end
        await asyncio.gather(*(caller() for _ in range(callers)))
        await remote.stop()
        return done

    counts.put(asyncio.run(run()))


async def measure(clients: int, callers: int, samples: int, duration_s: float, folder: Path) -> float:
    """Requests per second the model process answered to ``clients`` x ``callers`` callers."""
    state = ServiceState(Settings())
    state.engine = Engine(InstantBackend(), "instant", 0.1, Metrics(), max_batch_rows=4096, max_wait_ms=0,
                          max_queue=4096)
    state.manifest = SimpleNamespace(name="instant")  # type: ignore[assignment]  # what the link reads of it
    state.feedback = FeedbackStore(100_000, 3600)
    state.engine.start()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = WorkerLink(state, reader, writer)
        await link.send({"ready": True})
        await link.serve()

    path = folder / f"model-{samples}.sock"
    server = await asyncio.start_unix_server(on_connect, path=str(path))
    ctx = multiprocessing.get_context("spawn")
    counts, ready, go, start_at = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    processes = [ctx.Process(target=client, args=(str(path), callers, samples, duration_s, ready, go, start_at,
                                                  counts)) for _ in range(clients)]
    for p in processes:
        p.start()
    try:
        for _ in processes:
            await asyncio.to_thread(ready.get, True, READY_TIMEOUT_S)
        start_at.value = time.time() + 0.2
        go.set()
        answered = sum([await asyncio.to_thread(counts.get, True, duration_s + 60) for _ in processes])
    except queue.Empty:
        raise RuntimeError(f"not every client connected and answered one request within "
                           f"{READY_TIMEOUT_S:.0f} s") from None
    finally:
        for p in processes:
            p.join(10)
            p.kill()
        server.close()
        await state.engine.stop()
    return answered / duration_s


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_process_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4, help="worker processes sending requests (default: %(default)s)")
    p.add_argument("--callers", type=int, default=16, help="closed-loop callers per client (default: %(default)s)")
    p.add_argument("--samples", default="1,16", help="m of every request, comma-separated (default: %(default)s)")
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per run (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="runs per m; the median is reported (default: %(default)s)")
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    command = "python -m benchmarks.model_process_overhead " + shlex.join(argv)
    info = describe(torch.device("cpu"))
    print(f"{command}\nmachine: {summary_line(info)}", flush=True)
    table = []
    with tempfile.TemporaryDirectory(prefix="siam-hop-") as folder:
        for m in (int(s) for s in args.samples.split(",")):
            runs = [asyncio.run(measure(args.clients, args.callers, m, args.duration, Path(folder)))
                    for _ in range(args.rounds)]
            rate = statistics.median(runs)
            table.append({"samples": m, "clients": args.clients, "callers": args.callers,
                          "requests_per_s": rate, "runs": runs})
            print(f"  m = {m}, {args.clients} clients x {args.callers} callers: {rate:,.0f} requests/s "
                  f"(runs {', '.join(f'{r:,.0f}' for r in runs)})", flush=True)
    results = {"command": command, "machine": info, "table": table}
    save_results(results, args.output)
    return results


if __name__ == "__main__":
    main()
