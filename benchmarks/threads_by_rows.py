"""Where ``SIAM_ORT_THREADS=per-call`` and ``per-chunk`` each win, by the size of the batch.

One ``OnnxBackend.logits`` call of N noisy rows (one image, N copies), timed in-process with no HTTP,
for each way of sharing the CPU threads: ``per-call`` (one ONNX Runtime call on all threads) and
``per-chunk`` (one-thread calls on all threads at once). The two alternate within each round and the
first rotates, so a slow moment of a shared machine hits both; each figure is the median of the rounds'
medians. ``auto`` is built on this table: per-call below ``threads`` rows, per-chunk from there.

    python -m benchmarks.threads_by_rows checkpoints/resnet20-trades30 --threads 2 \\
        --output benchmarks/results/threads-by-rows-cpu-epyc.json
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

from benchmarks.machine import describe, save_results, summary_line
from benchmarks.report import in_turn
from service.backends import OnnxBackend, load_backend
from service.settings import DEFAULT_CHECKPOINT, Settings

MODES = ("per-call", "per-chunk")


def time_call(backend: OnnxBackend, image: torch.Tensor, rows: int, calls: int) -> float:
    """Median milliseconds of one ``logits`` call of ``rows`` noisy copies, after a warm call."""
    backend.logits(image, [rows], [None])
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        backend.logits(image, [rows], [None])
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.threads_by_rows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the model (default: %(default)s)")
    p.add_argument("--rows", default="1,2,4,8,16,32,64,128,256",
                   help="noisy rows per call, comma-separated (default: %(default)s)")
    p.add_argument("--chunk-rows", type=int, default=128, help="rows per ONNX Runtime call (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, both modes once each (default: %(default)s)")
    p.add_argument("--row-budget", type=int, default=200,
                   help="rows timed per round and size (at least 5 calls) (default: %(default)s)")
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads < 2:
        p.error("--threads must be at least 2: with one thread there is nothing to share")
    command = "python -m benchmarks.threads_by_rows " + shlex.join(argv)
    info = describe(torch.device("cpu"))
    print(f"{command}\nmachine: {summary_line(info)}", flush=True)
    backends = {}
    for mode in MODES:
        backend, _ = load_backend(Settings(checkpoint=args.checkpoint, backend="onnx", device="cpu",
                                           threads=args.threads, chunk_rows=args.chunk_rows, ort_threads=mode))
        assert isinstance(backend, OnnxBackend)
        backends[mode] = backend
    size = backends["per-call"].manifest.spec.architecture.input_size
    image = torch.rand(1, 3, size, size)
    table = []
    for rows in (int(r) for r in args.rows.split(",")):
        runs: dict[str, list[float]] = {mode: [] for mode in MODES}
        for round_ in range(args.rounds):
            for mode in in_turn(list(MODES), round_):
                runs[mode].append(time_call(backends[mode], image, rows, max(5, args.row_budget // rows)))
        ms = {mode: statistics.median(found) for mode, found in runs.items()}
        ratio = ms["per-chunk"] / ms["per-call"]
        table.append({"rows": rows, "ms": ms, "runs_ms": runs, "per_chunk_over_per_call": ratio})
        print(f"  {rows:4d} rows: per-call {ms['per-call']:7.2f} ms, per-chunk {ms['per-chunk']:7.2f} ms, "
              f"per-chunk / per-call {ratio:.2f}", flush=True)
    results = {"command": command, "machine": info, "checkpoint": str(args.checkpoint), "threads": args.threads,
               "chunk_rows": args.chunk_rows, "rounds": args.rounds, "table": table}
    if args.output:
        save_results(results, args.output)
    return results


if __name__ == "__main__":
    main()
