"""The engine alone, no HTTP: what batching, chunking and aggregation cost on top of the model.

The backend is built exactly as the service builds it (``load_backend``, then the start-up warm-up that
tunes ``chunk_rows`` when it is ``auto``), and ``concurrency`` closed-loop callers await
``Engine.predict`` on one image each, so the engine always has requests waiting, as under heavy load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.load import closed_loop_rate
from service.app import warm_up
from service.backends import Backend, load_backend
from service.engine import Engine
from service.metrics import Metrics
from service.settings import Settings


@dataclass
class EngineResult:
    samples: int
    concurrency: int
    duration_s: float
    completed: int
    predictions_per_s: float
    rows_per_s: float
    p50_ms: float
    p99_ms: float


def build_backend(checkpoint: Path, backend: str, device: str, threads: int | None, onnx_cache: Path,
                  chunk_rows: str = "auto", cuda_graphs: str | bool = "auto",
                  tuning_cache: Path | None = None) -> tuple[Backend, Settings, str, float]:
    """The service's backend and settings, warmed up and tuned like ``siam serve`` does at start-up (the
    tuned chunk size kept in ``tuning_cache``, by default beside ``onnx_cache``)."""
    settings = Settings(checkpoint=checkpoint, backend=backend, device=device, threads=threads,
                        onnx_cache=onnx_cache, chunk_rows=chunk_rows, cuda_graphs=cuda_graphs,  # type: ignore[arg-type]
                        tuning_cache=tuning_cache or onnx_cache.parent / "chunk-rows.json")
    built, manifest = load_backend(settings)
    warm_up(built, manifest, settings.tuning_cache if settings.chunk_rows == "auto" else None)
    return built, settings, manifest.name, manifest.spec.smoothing.sigma


async def closed_loop(engine: Engine, samples: int, concurrency: int, duration_s: float,
                      warmup_s: float) -> EngineResult:
    """``concurrency`` callers, each awaiting its answer before asking again; counts the answers that arrive
    in the measured window, at the rate :func:`~benchmarks.load.closed_loop_rate` gives."""
    image = torch.rand(1, 3, 32, 32)
    start = time.perf_counter() + warmup_s
    end = start + duration_s
    latencies: list[float] = []
    spans: list[tuple[int, float]] = []

    async def caller() -> None:
        count, first_sent, last_done = 0, 0.0, 0.0
        while (sent := time.perf_counter()) < end:
            await engine.predict(image, samples, "softmax")
            done = time.perf_counter()
            if start <= done <= end:
                latencies.append(done - sent)
                first_sent = first_sent if count else sent
                count, last_done = count + 1, done
        spans.append((count, last_done - first_sent))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    lat = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    rate = closed_loop_rate(spans)
    return EngineResult(samples, concurrency, duration_s, len(latencies), rate, rate * samples,
                        float(np.percentile(lat, 50)), float(np.percentile(lat, 99)))


async def run_engine(backend: Backend, settings: Settings, name: str, sigma: float,
                     plan: Sequence[tuple[int, int, float]], duration_s: float) -> list[EngineResult]:
    engine = Engine(backend, name, sigma, Metrics(), settings.max_batch_rows, settings.max_wait_ms,
                    settings.max_queue)
    engine.start()
    try:
        return [await closed_loop(engine, m, callers, duration_s, warmup_s) for m, callers, warmup_s in plan]
    finally:
        await engine.stop()


def measure_engine(backend: Backend, settings: Settings, name: str, sigma: float,
                   plan: Sequence[tuple[int, int, float]], duration_s: float) -> list[EngineResult]:
    """Engine throughput for each ``(samples, callers, warm-up seconds)`` of ``plan``."""
    return asyncio.run(run_engine(backend, settings, name, sigma, plan, duration_s))
