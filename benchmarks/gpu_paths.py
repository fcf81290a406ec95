"""What each GPU-path option buys, side by side in one process, no HTTP.

1. ``forward``: one ``TorchBackend.logits`` call of N noisy rows (one chunk), eager against replayed from
   CUDA graphs (``SIAM_CUDA_GRAPHS``), at several N.
2. ``engine``: the batching engine alone, closed-loop callers of one image each, on each variant's
   backend with the same chunk size (the eager backend's tuned one).
3. ``transfer``: copying a batch's images to the GPU from ordinary (pageable) and from pinned host
   memory, and back the logits, which is what pinned buffers and a copy stream could save.

Variants alternate within each round and the first rotates, so a slow moment hits both; each figure is
the median over rounds.

    python -m benchmarks.gpu_paths checkpoints/resnet20-trades30 --output benchmarks/results/gpu-paths-h200.json
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine_bench import build_backend, measure_engine
from benchmarks.machine import describe, save_results, summary_line
from benchmarks.report import in_turn
from service.backends import Backend
from service.settings import DEFAULT_CHECKPOINT, DEFAULT_ONNX_CACHE, Settings

VARIANTS = ("eager", "graphs")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_ms(backend: Backend, image: torch.Tensor, rows: int, calls: int) -> float:
    """Median milliseconds of one ``logits`` call of ``rows`` copies of one image, after a warm call."""
    backend.logits(image, [rows], [None])
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        backend.logits(image, [rows], [None])  # returns logits on the CPU: the call ends when the GPU has
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def copy_us(images: torch.Tensor, device: torch.device, calls: int) -> float:
    """Median microseconds to copy ``images`` to ``device`` and wait for it."""
    times = []
    for _ in range(calls + 1):
        start = time.perf_counter()
        images.to(device, non_blocking=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times[1:])


def back_us(logits: torch.Tensor, calls: int) -> float:
    """Median microseconds to copy ``logits`` from the GPU to ordinary host memory."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        logits.cpu()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def build(args: argparse.Namespace, variant: str, chunk_rows: int | str) -> tuple[Backend, Settings, str, float]:
    return build_backend(args.checkpoint, "torch", args.device, args.threads, DEFAULT_ONNX_CACHE, str(chunk_rows),
                         cuda_graphs=variant == "graphs", tuning_cache=args.tuning_cache)


def graphs_vs_eager(values: dict[str, float], higher_is_faster: bool) -> str:
    """``, graphs N.NNx eager`` (how much faster graphs ran) when both variants ran, else nothing."""
    if not {"graphs", "eager"} <= values.keys():
        return ""
    speedup = values["graphs"] / values["eager"] if higher_is_faster else values["eager"] / values["graphs"]
    return f", graphs {speedup:.2f}x eager"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_paths", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--device", default="cuda", help="cuda[:N]; cpu runs the eager variant only (default: cuda)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="eager, graphs (default: %(default)s)")
    p.add_argument("--sections", default="forward,engine,transfer", help="default: %(default)s")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--rows", default="1,16,64,256,1024", help="rows per forward call (default: %(default)s)")
    p.add_argument("--samples", default="1,16", help="m of the engine's callers (default: %(default)s)")
    p.add_argument("--callers", type=int, default=64, help="engine callers (default: %(default)s)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per engine cell (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every variant (default: %(default)s)")
    p.add_argument("--call-rows", type=int, default=2000,
                   help="rows timed per forward measurement: max(5, this // rows) calls (default: %(default)s)")
    p.add_argument("--tuning-cache", type=Path, default=Path(".siam-cache/chunk-rows.json"),
                   help="where the eager backend's tuned chunk size is kept (default: %(default)s)")
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    sections = set(args.sections.split(","))
    if unknown := set(variants) - set(VARIANTS):
        p.error(f"unknown variants {sorted(unknown)}; expected {', '.join(VARIANTS)}")
    device = torch.device(args.device)
    if "graphs" in variants and device.type != "cuda":
        p.error("the graphs variant needs --device cuda")
    command = "python -m benchmarks.gpu_paths " + shlex.join(argv)
    info = describe(device)
    print(f"{command}\nmachine: {summary_line(info)}", flush=True)
    eager, settings, name, sigma = build(args, "eager", "auto")
    chunk = eager.chunk_rows
    backends = {"eager": eager}
    if "graphs" in variants:
        backends["graphs"] = build(args, "graphs", chunk)[0]
    backends = {v: backends[v] for v in variants}
    size = eager.manifest.spec.architecture.input_size  # type: ignore[attr-defined]
    image = torch.rand(1, 3, size, size)
    results: dict[str, Any] = {"command": command, "machine": info, "chunk_rows": chunk, "variants": variants}
    print(f"chunk_rows {chunk} (tuned on the eager backend; every variant uses it)")

    if "forward" in sections:
        table = []
        for rows in (int(r) for r in args.rows.split(",")):
            runs: dict[str, list[float]] = {v: [] for v in variants}
            for round_ in range(args.rounds):
                for v in in_turn(variants, round_):
                    backends[v].chunk_rows = max(chunk, rows)  # one call, one chunk
                    runs[v].append(forward_ms(backends[v], image, rows, max(5, args.call_rows // rows)))
                    backends[v].chunk_rows = chunk
            ms = {v: statistics.median(found) for v, found in runs.items()}
            line = {"rows": rows, "ms": ms, "runs_ms": runs, "rows_per_s": {v: rows / t * 1e3 for v, t in ms.items()}}
            table.append(line)
            ratio = graphs_vs_eager(ms, higher_is_faster=False)
            print(f"  forward, {rows:5d} rows: " + ", ".join(f"{v} {t:.3f} ms" for v, t in ms.items()) + ratio,
                  flush=True)
        results["forward"] = table

    if "engine" in sections:
        table = []
        for m in (int(s) for s in args.samples.split(",")):
            runs = {v: [] for v in variants}
            for round_ in range(args.rounds):
                for v in in_turn(variants, round_):
                    found = measure_engine(backends[v], settings, name, sigma, [(m, args.callers, 0.5)],
                                           args.duration)[0]
                    runs[v].append(found.predictions_per_s)
            rate = {v: statistics.median(found) for v, found in runs.items()}
            table.append({"samples": m, "callers": args.callers, "predictions_per_s": rate, "runs": runs})
            ratio = graphs_vs_eager(rate, higher_is_faster=True)
            print(f"  engine, m = {m}, {args.callers} callers: " +
                  ", ".join(f"{v} {r:.0f} pred/s" for v, r in rate.items()) + ratio, flush=True)
        results["engine"] = table

    if "transfer" in sections and device.type == "cuda":
        table = []
        for n in (64, 1024):
            pageable = torch.rand(n, 3, size, size)
            pinned = pageable.pin_memory()
            logits = torch.rand(n * 16, 10, device=device)
            line = {"images": n, "pageable_us": copy_us(pageable, device, 50),
                    "pinned_us": copy_us(pinned, device, 50), "logits_back_us": back_us(logits, 50)}
            table.append(line)
            print(f"  transfer, {n} images: pageable {line['pageable_us']:.0f} us, pinned {line['pinned_us']:.0f} us; "
                  f"{n * 16} rows of logits back {line['logits_back_us']:.0f} us", flush=True)
        results["transfer"] = table
    if "graphs" in backends:
        results["graph_sizes"] = sorted(backends["graphs"].graphed.graphs)  # type: ignore[attr-defined]
    save_results(results, args.output)
    return results


if __name__ == "__main__":
    main()
