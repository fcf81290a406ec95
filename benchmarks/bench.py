"""``siam bench``: how close the service serves to the model's own limit, beside what users would run instead.

In one run on this machine it measures (1) the limit: the base model's forward throughput on noisy rows
per backend at its best chunk size; (2) the batching engine alone at each ``--samples``; (3) the
service end to end over HTTP, a load generator in its own process driving 1..N closed-loop clients;
(4) the same load against the obvious FastAPI service (on PyTorch, and on the service's own ONNX graph)
and LitServe, serving the same checkpoint with the same smoothing, and against a server that answers at
once, which shows the load generator's own ceiling. It prints a table whose every row
carries its ratio to the limit and to the baselines, the targets of issue 6, and writes
``<output>.json`` (with the machine described) and ``<output>.png``.

A cell whose clients x samples rows could not go round twice in ``--duration`` even at the limit is
skipped (its percentiles would rest on one round); ``--all-cells`` runs it anyway.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks import limit as limits
from benchmarks import machine, report
from benchmarks.engine_bench import build_backend, measure_engine
from benchmarks.load import run_in_process
from benchmarks.plot import plot_results
from benchmarks.report import CEILING
from benchmarks.servers import (
    ServerProcess,
    SystemSpec,
    fastapi_spec,
    instant_spec,
    litserve_spec,
    model_info,
    service_spec,
)
from models.cli_types import (
    non_negative_float,
    positive_float,
    positive_int,
    positive_int_list,
    stopping_confidence,
    unwritable,
)
from service.backends import resolve_device
from service.settings import DEFAULT_CHECKPOINT, DEFAULT_ONNX_CACHE
from training.data import DEFAULT_DATA, load_split

# Under runs/ (ignored by git): a run must not overwrite the committed results in benchmarks/results/.
RESULTS = Path("runs") / "bench"
SYSTEMS = ("siam", "siam-torch", "siam-workers", "fastapi", "fastapi-onnx", "litserve", CEILING)
DEFAULT_SYSTEMS = ("siam", "fastapi", "fastapi-onnx", "litserve", CEILING)


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="siam bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint folder [%(default)s]")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (about a minute)")
    p.add_argument("--duration", type=positive_float, default=None, help="measured seconds per cell [4; quick 1]")
    p.add_argument("--warmup", type=non_negative_float, default=None,
                   help="seconds of load before measuring; at least 1.5 rounds of every client's copies [1; quick 0.3]")
    p.add_argument("--concurrency", type=positive_int_list, default=None, help="HTTP clients [1,8,64; quick 1,8]")
    p.add_argument("--samples", type=positive_int_list, default=None, help="noisy copies m [1,16,64,256; quick 1,16]")
    p.add_argument("--backends", type=str_list, default=list(("torch", *limits.ONNX_VARIANTS)),
                   help="backends for the limit [" + ",".join(("torch", *limits.ONNX_VARIANTS)) + "]; the served "
                        "ones (torch, onnx, onnx-per-chunk: one-thread calls on all threads at once, as "
                        "SIAM_ORT_THREADS=per-chunk and auto run) set the limit the ratios use; onnx-bare (no "
                        "noise; the fastest of it and onnx-bare-per-chunk is the noise-free forward), "
                        "onnx-torch-noise (the noise drawn by torch on the CPU and fed to the graph: "
                        "SIAM_ORT_NOISE=torch) and onnx-int8 (where the checkpoint has an int8 graph) are shown "
                        "beside it")
    p.add_argument("--service-backend", default="auto", choices=["auto", "torch", "onnx"],
                   help="what the service and the engine run [auto: the service's own default]")
    p.add_argument("--systems", type=str_list, default=list(DEFAULT_SYSTEMS),
                   help="servers to load: siam (the service as shipped), siam-torch (on the PyTorch backend), "
                   "siam-workers (with --workers HTTP worker processes), fastapi (plain, PyTorch), fastapi-onnx "
                   "(plain, the service's ONNX graph), litserve, instant (answers at once, no model: the load "
                   "generator's own ceiling, measured at the first --samples only) "
                   "[siam,fastapi,fastapi-onnx,litserve,instant]")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                   help="CPU threads of every system [all cores]")
    p.add_argument("--workers", type=positive_int, default=2,
                   help="HTTP worker processes of the siam-workers system [2]")
    p.add_argument("--model-processes", type=positive_int_list, default=[1],
                   help="model processes of the siam-workers system, each fed by every K-th worker; several "
                   "(1,2,3) make one system each, siam-workers-Kmp, measured side by side [1]")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "true", "false"],
                   help="SIAM_CUDA_GRAPHS of the siam systems and the engine: replay the forward from CUDA graphs "
                   "(auto: on for the torch backend on a GPU) [auto]")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    p.add_argument("--engine-callers", type=positive_int, default=None, help="engine callers [most --concurrency]")
    p.add_argument("--chunks", type=positive_int_list, default=None,
                   help="chunk sizes for the limit [16..1024, and 2048 on a GPU; quick 32,128]")
    p.add_argument("--limit-budget", type=positive_float, default=None, help="seconds per chunk size [0.5; quick 0.15]")
    p.add_argument("--fastapi-mode", default="sync", choices=["sync", "async"], help="plain FastAPI endpoint kind")
    p.add_argument("--litserve-batch", type=positive_int, default=64, help="LitServe max_batch_size [64]")
    p.add_argument("--litserve-timeout", type=non_negative_float, default=0.005,
                   help="LitServe batch_timeout, s [0.005]")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="runs of every HTTP cell on every system, and of every backend's limit, the order rotating "
                        "between runs; the table shows medians and their min-max [1]")
    p.add_argument("--all-cells", action="store_true", help="do not skip cells too long for --duration")
    p.add_argument("--onnx-cache", type=Path, default=DEFAULT_ONNX_CACHE)
    p.add_argument("--confidence", type=stopping_confidence, default=None,
                   help="add cells of the service with sequential sampling at this confidence (e.g. 0.999), "
                        "--samples as the budget, beside its fixed cells; all cells then send real test images")
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 (archive or folder) for the test images "
                                                        "that --confidence sends [%(default)s]")
    p.add_argument("--images", type=positive_int, default=256, help="test images the clients send in turn [256]")
    p.add_argument("--output", type=Path, default=None,
                   help="results JSON; the PNG goes beside it [runs/bench/<device>-<cores>cores.json]")
    return p


def apply_defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    defaults = {"duration": (4.0, 1.0), "warmup": (1.0, 0.3), "concurrency": ([1, 8, 64], [1, 8]),
                "samples": ([1, 16, 64, 256], [1, 16]), "chunks": (list(limits.DEFAULT_CHUNKS), [32, 128]),
                "limit_budget": (0.5, 0.15)}
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.engine_callers is None:
        args.engine_callers = max(args.concurrency)
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"siam bench: unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    if args.cuda_graphs == "true" and args.service_backend != "torch":
        raise SystemExit("siam bench: --cuda-graphs true replays the torch backend's forward: add --service-backend "
                         "torch")
    if max(args.model_processes) > args.workers or min(args.model_processes) < 1:
        raise SystemExit("siam bench: --model-processes needs at least 1 and at most --workers")


def limit_chunks(chunks: list[int], device: torch.device, given: bool) -> list[int]:
    """The limit's chunk sizes: the default sweep gains 2048 rows on a GPU, where on an H200 the forward was
    still 6% faster at 2048 than at 1024 (a sweep given on the command line is kept as it is)."""
    return chunks if given or device.type != "cuda" or 2048 in chunks else [*chunks, 2048]


def rounds_fit(clients: int, samples: int, limit: float, duration: float) -> bool:
    """Whether every client's copies could go through the model twice in ``duration`` at the limit."""
    return 2 * clients * samples <= limit * duration


def warmup_for(clients: int, samples: int, limit: float, floor: float, duration: float) -> float:
    """At least one and a half rounds of every client's copies, so the measured window is steady state."""
    return min(max(floor, 1.5 * clients * samples / limit), duration)


def run_limits(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    # Measured --repeats times, in turn, like the HTTP cells: the noise-free row is then not always the
    # one measured right after the served graph.
    found = list(limits.limits_in_turn([(args.checkpoint, b) for b in args.backends], args.repeats, device,
                                       args.threads, args.chunks, args.limit_budget, args.onnx_cache).values())
    usable = [b for b in found if b.best_rows_per_s > 0 and b.backend in limits.SERVED]
    if not usable:
        raise SystemExit("siam bench: no served backend (torch, onnx) could run: "
                         + "; ".join(f"{b.backend}: {b.error}" for b in found))
    best = max(usable, key=lambda b: b.best_rows_per_s)
    for b in found:
        rates = ", ".join(f"{k}: {v:.0f}" for k, v in b.rates.items())
        print(f"  limit {b.backend} ({b.provider}): {rates or b.error} rows/s", flush=True)
    bare = max((b.best_rows_per_s for b in found if b.backend in limits.BARE and b.best_rows_per_s > 0), default=None)
    return {"backends": [limits.as_dict(b) for b in found], "_best": best,
            "best": {"backend": best.backend, "chunk": best.best_chunk, "rows_per_s": best.best_rows_per_s},
            "reference_rows_per_s": best.best_rows_per_s, "bare_rows_per_s": bare}


def run_engine(args: argparse.Namespace, device: torch.device, limit: float) -> dict[str, Any]:
    backend, settings, name, sigma = build_backend(args.checkpoint, args.service_backend, str(device), args.threads,
                                                   args.onnx_cache, cuda_graphs=args.cuda_graphs)
    plan, skipped = [], []
    for m in args.samples:
        callers = max(1, min(args.engine_callers, settings.max_batch_rows // m))
        if args.all_cells or rounds_fit(callers, m, limit, args.duration):
            plan.append((m, callers, warmup_for(callers, m, limit, args.warmup, args.duration)))
        else:
            skipped.append({"samples": m, "concurrency": callers, "reason": "fewer than 2 rounds fit in --duration"})
    results = measure_engine(backend, settings, name, sigma, plan, args.duration)
    info = {"backend": backend.name, "chunk_rows": backend.chunk_rows, "concurrency": args.engine_callers,
            "max_batch_rows": settings.max_batch_rows, "max_wait_ms": settings.max_wait_ms,
            "results": [asdict(r) for r in results], "skipped": skipped}
    for r in results:
        print(f"  engine m={r.samples} callers={r.concurrency}: {r.predictions_per_s:.1f} pred/s, "
              f"{r.rows_per_s:.0f} rows/s", flush=True)
    del backend
    gc.collect()
    return info


def system_specs(args: argparse.Namespace, device: torch.device) -> list[SystemSpec]:
    specs = []
    for name in args.systems:
        if name == "siam":
            specs.append(service_spec(args.checkpoint, args.threads, args.service_backend, str(device),
                                      args.onnx_cache, cuda_graphs=args.cuda_graphs))
        elif name == "siam-torch":
            specs.append(service_spec(args.checkpoint, args.threads, "torch", str(device), args.onnx_cache,
                                      name="siam-torch", cuda_graphs=args.cuda_graphs))
        elif name == "siam-workers":
            specs += [service_spec(args.checkpoint, args.threads, args.service_backend, str(device), args.onnx_cache,
                                   name="siam-workers" if args.model_processes == [1] else f"siam-workers-{k}mp",
                                   workers=args.workers, model_processes=k, cuda_graphs=args.cuda_graphs)
                      for k in args.model_processes]
        elif name == CEILING:
            specs.append(instant_spec())
        elif name in ("fastapi", "fastapi-onnx"):
            backend = "onnx" if name == "fastapi-onnx" else "torch"
            specs.append(fastapi_spec(args.checkpoint, args.threads, str(device), args.fastapi_mode, backend,
                                      args.onnx_cache))
        elif machine.version("litserve"):
            specs.append(litserve_spec(args.checkpoint, args.threads, str(device), args.litserve_batch,
                                       args.litserve_timeout))
        else:
            print("  litserve is not installed (pip install -e '.[dev]'); skipping that baseline", flush=True)
    return specs


def start_all(specs: list[SystemSpec]) -> tuple[list[ServerProcess], dict[str, Any]]:
    """Start the systems one at a time (the service tunes its chunk size on a quiet machine), each paused
    once ready; returns them and what each says about itself."""
    servers: list[ServerProcess] = []
    systems: dict[str, Any] = {}
    try:
        for spec in specs:
            server = ServerProcess(spec)
            servers.append(server)
            server.wait_ready()
            systems[spec.name] = {**spec.config, "startup_s": round(server.startup_s, 2), **model_info(server)}
            server.pause()
            print(f"  {spec.name} ready in {server.startup_s:.1f} s", flush=True)
    except Exception:
        for server in servers:
            server.stop()
        raise
    return servers, systems


def measure(server: ServerProcess, samples: int, clients: int, duration: float, warmup: float,
            images_dir: Path | None = None, confidence: float | None = None) -> dict[str, Any]:
    """One cell on one system, the others paused."""
    server.resume()
    try:
        r = run_in_process(server.predict_url, samples, clients, duration, warmup, server.spec.body_style,
                           images_dir, confidence)
    finally:
        server.pause()
    name = server.spec.name + (f" sequential {confidence:g}" if confidence is not None else "")
    used = f"  {r.mean_samples_used:.1f} copies/image" if r.mean_samples_used is not None else ""
    print(f"  {name:12} m={samples:<4} clients={clients:<3} {r.predictions_per_s:8.1f} pred/s "
          f"{r.rows_per_s:8.0f} rows/s  p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms{used}"
          + (f"  errors {r.errors}: {r.first_error}" if r.errors else ""), flush=True)
    return {"system": name, **{k: v for k, v in asdict(r).items() if k not in ("latencies_ms", "samples_used")},
            "warmup_s": round(warmup, 2)}


def extract_test_images(data: str, count: int, folder: Path) -> Path:
    """``count`` test images (a fixed random subset) as PNG files in ``folder``: what the clients send."""
    from PIL import Image

    test = load_split(data, "test").subset(count, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(test.images.numpy()):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:05d}.png")
    return folder


def run_http(args: argparse.Namespace, device: torch.device, limit: float,
             images_dir: Path | None = None) -> dict[str, Any]:
    """All servers up at once, then each cell against each system back to back; the systems not being
    measured are paused (SIGSTOP), so only the one under load and the load generator use the CPU. With
    ``--confidence`` the service also serves each cell with m >= 16 in sequential mode, m as the budget."""
    servers, systems = start_all(system_specs(args, device))
    cells: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    try:
        for m in args.samples:
            for clients in args.concurrency:
                if not (args.all_cells or rounds_fit(clients, m, limit, args.duration)):
                    skipped.append({"samples": m, "concurrency": clients,
                                    "reason": f"{clients}x{m} rows cannot go round twice in {args.duration:g} s "
                                              f"even at the limit ({limit:.0f} rows/s)"})
                    print(f"  skip m={m} clients={clients}: fewer than 2 rounds fit", flush=True)
                    continue
                warmup = warmup_for(clients, m, limit, args.warmup, args.duration)
                # The ceiling does not depend on m (no model): measured once per client count.
                kinds = [(server, None) for server in servers
                         if server.spec.name != CEILING or m == args.samples[0]] + [
                    (server, args.confidence) for server in servers
                    if args.confidence is not None and m >= 16 and server.spec.name.startswith("siam")]
                runs: list[list[dict[str, Any]]] = [[] for _ in kinds]
                for r in range(args.repeats):  # rotated, so no system always runs first after a pause
                    for k in report.in_turn(range(len(kinds)), r):
                        server, confidence = kinds[k]
                        runs[k].append(measure(server, m, clients, args.duration, warmup, images_dir, confidence))
                cells += [report.combine_runs(r) for r in runs]
    finally:
        for server in servers:
            server.stop()
    return {"systems": systems, "cells": cells, "skipped": skipped}


def default_output(device: torch.device) -> Path:
    return RESULTS / f"{device.type}-{os.cpu_count()}cores.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    apply_defaults(args)
    warnings.filterwarnings("ignore")  # the ONNX exporter's constant-folding chatter
    started, t0 = datetime.now(UTC), time.perf_counter()
    device = resolve_device(args.device)
    args.chunks = limit_chunks(args.chunks, device, given="--chunks" in argv or args.quick)
    info = machine.describe(device)
    command = "siam bench " + shlex.join(argv)
    print(f"{command}\nmachine: {machine.summary_line(info)}\n", flush=True)
    if not (args.checkpoint / "manifest.json").is_file():
        raise SystemExit(f"siam bench: {args.checkpoint} is not a checkpoint folder (train one, or --checkpoint)")
    output = args.output or default_output(device)
    if problem := unwritable(output.parent):
        raise SystemExit(f"siam bench: cannot write --output {output}: {problem}")

    print("1. the limit: model forward on noisy rows, per backend and chunk size", flush=True)
    limit_info = run_limits(args, device)
    best = limit_info.pop("_best")
    reference = limit_info["reference_rows_per_s"]
    print("2. the engine alone (no HTTP)", flush=True)
    engine_info = run_engine(args, device, reference)
    print("3-4. HTTP: the service and the baselines, back to back per cell", flush=True)
    with tempfile.TemporaryDirectory(prefix="siam-bench-") as tmp:
        images_dir = (extract_test_images(args.data, args.images, Path(tmp) / "images")
                      if args.confidence is not None else None)
        http_info = run_http(args, device, reference, images_dir)
    again = limits.recheck(best, args.checkpoint, device, args.threads, args.limit_budget, args.onnx_cache)
    limit_info["recheck_rows_per_s"] = again
    limit_info["drift"] = again / reference - 1
    limit_info["reference_rows_per_s"] = max(reference, again)  # the higher one: ratios never flatter
    info["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    results: dict[str, Any] = {
        "schema": 1, "command": command, "started": started.isoformat(timespec="seconds"), "machine": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "limit": limit_info, "engine": engine_info, "http": http_info,
    }
    report.add_ratios(results)
    results["targets"] = report.evaluate_targets(results)
    results["wall_s"] = round(time.perf_counter() - t0, 1)

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    png = plot_results(results, output.with_suffix(".png"))
    print(f"\nlimit drift over the run: {limit_info['drift'] * 100:+.1f}% "
          f"(ratios use the higher of the two: {limit_info['reference_rows_per_s']:.0f} rows/s)\n")
    print(report.render_table(report.table_rows(results)))
    print("\ntargets (issue 6):\n" + report.render_targets(results["targets"]))
    print(f"\nwrote {output} and {png} in {results['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
