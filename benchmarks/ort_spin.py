"""What ``SIAM_ORT_SPIN``, ``SIAM_ORT_THREADS`` and ``SIAM_ORT_NOISE`` buy: ``siam serve`` with each of
ONNX Runtime's modes, side by side in one run, over HTTP cells from the load generator in its own process.

ONNX Runtime's idle threads busy-wait for the next piece of work. Inside a call that makes the hand-offs
between operators quick; between calls (``always``, ORT's default) it takes CPU from the event loop that
parses requests and writes answers, which on a machine with few cores is the same CPU. ``in-run`` stops
the spinning when a call returns, ``never`` lets the threads sleep. ``per-chunk`` gives every call one
thread and runs a batch's chunks on all the threads at once (``SIAM_ORT_THREADS=per-chunk``);
``threads-auto`` does the same except for a batch with fewer rows than threads (``SIAM_ORT_THREADS=auto``).
``torch-noise`` draws the noise with ``torch.randn`` and feeds it to the graph (``SIAM_ORT_NOISE=torch``). Modes
alternate within each round (``--rounds``), the first one rotating from round to round, so a slow moment
of a shared machine hits them all; medians and spread are reported, and each mode's ratio to the first.

    python -m benchmarks.ort_spin checkpoints/resnet20-pgd7 --rounds 3 \\
        --output benchmarks/results/ort-spin-cpu-epyc.json
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.load import run_in_process
from benchmarks.machine import describe, save_results, summary_line
from benchmarks.report import in_turn
from benchmarks.servers import ServerProcess, SystemSpec
from service.settings import DEFAULT_CHECKPOINT

MODES = {"always": ["--ort-spin", "always"], "in-run": ["--ort-spin", "in-run"], "never": ["--ort-spin", "never"],
         "per-chunk": ["--ort-threads", "per-chunk"], "threads-auto": ["--ort-threads", "auto"],
         "torch-noise": ["--ort-noise", "torch"]}


def parse_cells(text: str) -> list[tuple[int, int]]:
    """``"16x64,1x1"`` -> [(m=16, clients=64), (m=1, clients=1)]."""
    cells = []
    for part in text.split(","):
        samples, _, clients = part.partition("x")
        cells.append((int(samples), int(clients)))
    return cells


def measure_mode(checkpoint: Path, mode: str, cells: list[tuple[int, int]], duration: float,
                 extra: list[str]) -> dict[str, dict[str, float]]:
    spec = SystemSpec("siam", ["service.cli", str(checkpoint), "--port", "{port}", "--log-level", "warning",
                               *MODES[mode], *extra], "/health/ready", "query")
    out = {}
    with ServerProcess(spec) as server:
        for samples, clients in cells:
            r = run_in_process(server.predict_url, samples, clients, duration, 1.0)
            if r.errors:
                raise RuntimeError(f"{mode}, m={samples} x {clients}: {r.errors} errors ({r.first_error})")
            out[f"m{samples}x{clients}"] = {"rows_per_s": r.rows_per_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.ort_spin", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--cells", default="16x64,1x1,1x64", help="m x clients, comma-separated (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, every mode once each (default: %(default)s)")
    p.add_argument("--duration", type=float, default=6.0, help="measured seconds per cell (default: %(default)s)")
    p.add_argument("--serve-args", default="--chunk-rows 64", help="extra `siam serve` flags (default: %(default)s)")
    p.add_argument("--modes", default=",".join(MODES), help="which modes, comma-separated; the first is the "
                   "reference of the ratios (default: %(default)s)")
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        p.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    command = "python -m benchmarks.ort_spin " + shlex.join(argv)
    info = describe(torch.device("cpu"))
    print(f"{command}\nmachine: {summary_line(info)}", flush=True)
    cells = parse_cells(args.cells)
    runs: dict[str, list[dict[str, dict[str, float]]]] = {mode: [] for mode in modes}
    for round_ in range(1, args.rounds + 1):
        for mode in in_turn(modes, round_ - 1):  # the first mode rotates: the first one after a start lags
            runs[mode].append(measure_mode(args.checkpoint, mode, cells, args.duration, shlex.split(args.serve_args)))
            print(f"  round {round_} {mode:>6}: " + ", ".join(
                f"{cell} {v['rows_per_s']:.0f} rows/s p50 {v['p50_ms']:.2f} ms" for cell, v in runs[mode][-1].items()),
                flush=True)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for mode in modes:
        table[mode] = {}
        for cell in runs[mode][0]:
            rates = [run[cell]["rows_per_s"] for run in runs[mode]]
            p50s = [run[cell]["p50_ms"] for run in runs[mode]]
            table[mode][cell] = {"rows_per_s": statistics.median(rates), "rows_per_s_min": min(rates),
                                 "rows_per_s_max": max(rates), "p50_ms": statistics.median(p50s),
                                 "p50_ms_min": min(p50s), "p50_ms_max": max(p50s)}
    print(f"\nmedians of {args.rounds} rounds (ratio to {modes[0]}):")
    for mode in modes:
        print(f"  {mode:>6}: " + ", ".join(
            f"{cell} {v['rows_per_s']:.0f} rows/s ({v['rows_per_s'] / table[modes[0]][cell]['rows_per_s']:.2f}x), "
            f"p50 {v['p50_ms']:.2f} ms ({v['p50_ms'] / table[modes[0]][cell]['p50_ms']:.2f}x)"
            for cell, v in table[mode].items()))
    results = {"command": command, "machine": info, "checkpoint": str(args.checkpoint), "medians": table,
               "runs": runs}
    save_results(results, args.output)
    return results


if __name__ == "__main__":
    main()
