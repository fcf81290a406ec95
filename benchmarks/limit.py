"""The limit: the base model's own forward throughput on noisy rows, per backend and chunk size.

Nothing served can beat it: every smoothed prediction is ``m`` such rows. For PyTorch it is the model
on pre-made rows with the smoothing noise drawn on the device in the same call (``Smooth.forward_noisy``,
what the torch backend runs per chunk); for ONNX Runtime it is the exported graph, whose noise is drawn
inside the graph, fed with pre-made rows. No decoding, queueing, aggregation or copying is counted.

More rows put it in context, none served by default: ``onnx-bare``, the same network exported without
its noise (what the forward alone costs: the noise is part of the service's cost), ``onnx-torch-noise``,
the graph fed noise that ``torch.randn`` drew on the CPU (``SIAM_ORT_NOISE=torch``;
``models.onnx.with_noise_input``), and ``onnx-int8``, the checkpoint's int8 graph (``siam export --int8``;
``SIAM_PRECISION=int8``). ``onnx-per-chunk`` and ``onnx-bare-per-chunk`` run the same graphs the way
``SIAM_ORT_THREADS=per-chunk`` (and ``auto``, for every batch of two rows or more) does: one thread per call,
as many calls at once as threads, each a chunk. That is faster than one call on all the threads on a few
CPU cores, so it belongs in the limit a service running it is measured against.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import in_turn
from models.checkpoint import Manifest, load_checkpoint
from models.onnx import export_onnx
from models.smooth import Smooth
from service.backends import int8_graph, onnx_graph
from service.settings import DEFAULT_ONNX_CACHE

DEFAULT_CHUNKS = (16, 32, 64, 128, 256, 512, 1024)
ONNX_VARIANTS = ("onnx", "onnx-per-chunk", "onnx-bare", "onnx-bare-per-chunk", "onnx-torch-noise", "onnx-int8")
SERVED = ("torch", "onnx", "onnx-per-chunk")
"""The backends the service runs at full precision: the limit a served answer is measured against."""
BARE = ("onnx-bare", "onnx-bare-per-chunk")
"""The network without its noise, both ways of sharing the threads: the faster is the noise-free forward."""


@dataclass
class BackendLimit:
    """One backend's rows/s at each chunk size, and the best of them."""

    backend: str
    provider: str
    rates: dict[int, float]  # chunk rows -> noisy rows per second
    best_chunk: int
    best_rows_per_s: float
    error: str | None = None
    runs_rows_per_s: list[float] = field(default_factory=list)  # each run's best, when measured more than once


def rows_per_second(run: Callable[[], object], rows: int, budget_s: float, sync: Callable[[], None]) -> float:
    """Rows/s of ``run`` (``rows`` rows a call) over at least ``budget_s`` seconds, after one warm call."""
    run()
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        if calls % 4 == 0 or rows >= 256:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= budget_s:
                return calls * rows / elapsed


def torch_limit(model: torch.nn.Module, manifest: Manifest, device: torch.device, chunks: Sequence[int],
                budget_s: float) -> BackendLimit:
    """Eager PyTorch: ``Smooth.forward_noisy`` on one chunk of pre-made rows (noise drawn on ``device``)."""
    model = model.to(device).eval()
    smooth = Smooth(model, manifest.spec.smoothing, manifest.spec.architecture.num_classes)
    size = manifest.spec.architecture.input_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = {}
    with torch.inference_mode():
        for chunk in chunks:
            rows = torch.rand(chunk, 3, size, size, device=device)
            rates[chunk] = rows_per_second(lambda rows=rows: smooth.forward_noisy(rows), chunk, budget_s, sync)
    best = max(rates, key=rates.__getitem__)
    return BackendLimit("torch", str(device), rates, best, rates[best])


def onnx_limit(model: torch.nn.Module, manifest: Manifest, checkpoint: Path, cache: Path, device: torch.device,
               threads: int, chunks: Sequence[int], budget_s: float, variant: str = "onnx") -> BackendLimit:
    """ONNX Runtime on pre-made rows, the session set up like the service's: the exported graph (noise
    inside; ``onnx``), the same network without noise (``onnx-bare``), the graph fed noise drawn by torch
    (``onnx-torch-noise``, on the CPU) or the int8 graph (``onnx-int8``); ``-per-chunk``: one-thread calls,
    ``threads`` of them at once (``SIAM_ORT_THREADS=per-chunk``), ``chunk`` rows each."""
    import onnxruntime as ort

    from models.onnx import NOISE_INPUT, with_noise_input

    parallel = variant.endswith("-per-chunk")
    variant_graph = variant.removesuffix("-per-chunk")
    if parallel and (device.type != "cpu" or threads < 2):
        raise ValueError(f"{variant} shares a batch among CPU threads: measure it with --device cpu and "
                         "--threads 2 or more")
    if variant_graph == "onnx-int8":
        path = int8_graph(manifest, checkpoint)
    elif variant_graph == "onnx-bare":
        path = cache / f"{manifest.name}-{manifest.weights.sha256[:16]}-bare.onnx"
        if not path.is_file():
            export_onnx(model.cpu(), manifest.spec, path, manifest.weights.sha256, noise=False)
    else:  # onnx, onnx-torch-noise
        path = onnx_graph(model.cpu(), manifest, checkpoint, cache)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1 if parallel else threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers: list[object] = ["CPUExecutionProvider"]
    if device.type == "cuda":
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    fed_noise = variant == "onnx-torch-noise"
    if fed_noise and device.type != "cpu":
        raise ValueError("onnx-torch-noise draws the noise on the CPU; measure it with --device cpu")
    session = ort.InferenceSession(with_noise_input(path) if fed_noise else str(path), options, providers=providers)
    provider = session.get_providers()[0]
    inputs = {i.name for i in session.get_inputs()}  # the bare graph has no sigma
    sigma = np.array([manifest.spec.smoothing.sigma], dtype=np.float32)
    size = manifest.spec.architecture.input_size
    rates = {}
    for chunk in chunks:
        rows = np.random.rand(chunk, 3, size, size).astype(np.float32)
        feed = {k: v for k, v in {"images": rows, "sigma": sigma}.items() if k in inputs}

        def run_one(feed: dict[str, np.ndarray] = feed) -> object:
            fresh = {NOISE_INPUT: torch.randn(feed["images"].shape).numpy()} if fed_noise else {}
            return session.run(["logits"], {**feed, **fresh})

        if parallel:
            with ThreadPoolExecutor(threads) as pool:
                rates[chunk] = rows_per_second(lambda: list(pool.map(lambda _: run_one(), range(threads))),
                                               chunk * threads, budget_s, lambda: None)
        else:
            rates[chunk] = rows_per_second(run_one, chunk, budget_s, lambda: None)
    best = max(rates, key=rates.__getitem__)
    return BackendLimit(variant, provider, rates, best, rates[best])


def measure_limits(checkpoint: Path, device: torch.device, threads: int, backends: Sequence[str],
                   chunks: Sequence[int] = DEFAULT_CHUNKS, budget_s: float = 0.5,
                   onnx_cache: Path = DEFAULT_ONNX_CACHE) -> list[BackendLimit]:
    """Every requested backend's limit; a backend that cannot run here is reported with its error."""
    torch.set_num_threads(threads)
    model, manifest = load_checkpoint(checkpoint, "cpu")
    out = []
    for name in backends:
        try:
            if name == "torch":
                out.append(torch_limit(model, manifest, device, chunks, budget_s))
            elif name in ONNX_VARIANTS:
                out.append(onnx_limit(model, manifest, checkpoint, onnx_cache, device, threads, chunks, budget_s,
                                      name))
            else:
                raise ValueError(f"unknown backend {name!r}; expected torch, {', '.join(ONNX_VARIANTS)}")
        except (RuntimeError, ValueError, ImportError) as e:
            out.append(BackendLimit(name, "-", {}, 0, 0.0, f"{type(e).__name__}: {e}"))
    return out


def median_limit(runs: Sequence[BackendLimit]) -> BackendLimit:
    """One backend's limit from repeated measurements: the median rows/s at each chunk size and the best
    of those medians, each run's best kept beside it. A run that failed makes the whole a failure."""
    if failed := next((r for r in runs if r.error), None):
        return failed
    if len(runs) == 1:
        return runs[0]
    rates = {k: statistics.median(r.rates[k] for r in runs) for k in runs[0].rates}
    best = max(rates, key=rates.__getitem__)
    return BackendLimit(runs[0].backend, runs[0].provider, rates, best, rates[best],
                        runs_rows_per_s=[r.best_rows_per_s for r in runs])


def limits_in_turn(pairs: Sequence[tuple[Path, str]], rounds: int, device: torch.device, threads: int,
                   chunks: Sequence[int], budget_s: float,
                   onnx_cache: Path = DEFAULT_ONNX_CACHE) -> dict[tuple[Path, str], BackendLimit]:
    """The limit of every (checkpoint, backend) pair, measured ``rounds`` times in turn, the first place
    rotating (whatever is measured first was seen to lag), and the median kept (:func:`median_limit`)."""
    runs: dict[tuple[Path, str], list[BackendLimit]] = {pair: [] for pair in pairs}
    for round_ in range(rounds):
        for checkpoint, backend in in_turn(pairs, round_):
            runs[checkpoint, backend] += measure_limits(checkpoint, device, threads, [backend], chunks, budget_s,
                                                        onnx_cache)
    return {pair: median_limit(found) for pair, found in runs.items()}


def recheck(limit: BackendLimit, checkpoint: Path, device: torch.device, threads: int, budget_s: float,
            onnx_cache: Path) -> float:
    """The best chunk's rows/s measured again (at the end of a run), to see how much the machine drifted."""
    again = measure_limits(checkpoint, device, threads, [limit.backend], [limit.best_chunk], budget_s, onnx_cache)
    return again[0].best_rows_per_s


def as_dict(limit: BackendLimit) -> dict[str, object]:
    d = asdict(limit)
    d["rates"] = {str(k): round(v, 1) for k, v in limit.rates.items()}
    return d


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.limit A B ...``: the limits of several checkpoints (or backends) side by side, in
    one run; with ``--rounds N`` every pair is measured N times, in turn (the first place rotating from round
    to round), and the median kept."""
    import argparse
    import shlex
    import sys

    from benchmarks import machine

    p = argparse.ArgumentParser(prog="python -m benchmarks.limit", description=main.__doc__)
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint folders; ratios are to the first")
    p.add_argument("--backend", default="torch", help="one or more of torch, " + ", ".join(ONNX_VARIANTS)
                   + ", comma-separated [%(default)s]")
    p.add_argument("--rounds", type=int, default=1, help="measurements of each checkpoint and backend, in turn "
                   "(a slow moment of a shared machine then hits them all); the median is kept [%(default)s]")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] [%(default)s]")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads [all cores]")
    p.add_argument("--chunks", default="64,256", help="chunk sizes tried, the best kept [%(default)s]")
    p.add_argument("--budget", type=float, default=2.0, help="seconds per chunk size [%(default)s]")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print("command: python -m benchmarks.limit " + shlex.join(sys.argv[1:] if argv is None else argv))
    print("machine: " + machine.summary_line(machine.describe(device)))
    chunks = [int(c) for c in args.chunks.split(",")]
    backends = args.backend.split(",")
    if unknown := [b for b in backends if b not in ("torch", *ONNX_VARIANTS)]:
        p.error(f"unknown backend(s) {', '.join(unknown)}; choose from torch, {', '.join(ONNX_VARIANTS)}")
    pairs = [(c, b) for c in args.checkpoints for b in backends]
    first = None
    for (checkpoint, backend), limit in limits_in_turn(pairs, args.rounds, device, args.threads, chunks,
                                                       args.budget).items():
        if limit.error:
            print(f"{checkpoint} {backend}: {limit.error}")
            continue
        first = first or limit.best_rows_per_s
        rates = ", ".join(f"chunk {k}: {v:.0f}" for k, v in limit.rates.items())
        spread = f", runs {min(limit.runs_rows_per_s):.0f}-{max(limit.runs_rows_per_s):.0f}" \
            if limit.runs_rows_per_s else ""
        print(f"{checkpoint} {backend}: {limit.best_rows_per_s:.0f} rows/s ({rates}{spread}); "
              f"{limit.best_rows_per_s / first:.2f}x the first")


if __name__ == "__main__":
    main()
