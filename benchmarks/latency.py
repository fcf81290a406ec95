"""Latency of one smoothed prediction against m, for several checkpoints side by side in one run.

What a single client waits for the model: one image, ``m`` noisy copies, on the backend the service
would pick for that checkpoint (``SIAM_BACKEND=auto``: ONNX Runtime, or PyTorch for PNI-W), noise drawn
on the device, copies aggregated. No HTTP, no queueing: ``siam bench`` measures those. The median of
``--repeats`` calls after one warm-up, per (checkpoint, m), interleaved across m.

    python -m benchmarks.latency checkpoints/resnet20-pgd7 checkpoints/resnet20-smoothadv-s025 --threads 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import describe, summary_line
from models.smooth import summarize
from service.backends import load_backend, resolve_device
from service.settings import DEFAULT_ONNX_CACHE, Settings


def load(checkpoint: str, device: str, threads: int | None, cache: Path) -> tuple[Any, Any]:
    """The backend the service would choose for ``checkpoint`` (``SIAM_BACKEND=auto``), and its manifest."""
    return load_backend(Settings(checkpoint=Path(checkpoint), device=device, threads=threads, chunk_rows=256,
                                 onnx_cache=cache))


def measure(checkpoint: str, samples: list[int], device: str, threads: int | None, repeats: int,
            cache: Path) -> dict[str, Any]:
    """Median milliseconds per m for one checkpoint, its calls interleaved across m (each round times
    every m once). One checkpoint's backend at a time: ONNX Runtime's idle threads spin for a while
    after each call, so two live sessions would slow each other down and distort the comparison."""
    backend, manifest = load(checkpoint, device, threads, cache)
    target = resolve_device(device)
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    size = manifest.spec.architecture.input_size
    image = torch.rand(1, 3, size, size)
    times: dict[int, list[float]] = {m: [] for m in samples}
    for round_ in range(repeats + 1):  # round 0 warms every shape up
        for m in samples:
            start = time.perf_counter()
            summarize(backend.logits(image, [m], [None]), [m], manifest.spec.smoothing.aggregation)
            sync()
            if round_:
                times[m].append((time.perf_counter() - start) * 1000)
    return {"checkpoint": checkpoint, "model": manifest.name, **backend.describe(),
            "ms": {m: statistics.median(times[m]) for m in samples}}


def to_markdown(rows: list[dict[str, Any]], samples: list[int]) -> str:
    lines = ["| model | backend | " + " | ".join(f"m={m}" for m in samples) + " |",
             "|---|---|" + "---|" * len(samples)]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['backend']} | " + " | ".join(f"{r['ms'][m]:.1f}" for m in samples) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--samples", default="1,4,16,64,256", help="m values (default: %(default)s)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=21, help="timed calls per cell (default: %(default)s)")
    p.add_argument("--onnx-cache", default=str(DEFAULT_ONNX_CACHE))
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    samples = [int(m) for m in args.samples.split(",") if m.strip()]
    info = describe(resolve_device(args.device))
    command = "python -m benchmarks.latency " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows = [measure(c, samples, args.device, args.threads, args.repeats, Path(args.onnx_cache))
            for c in args.checkpoints]
    print(f"{command}\n{summary_line(info)}\nmilliseconds per prediction of one image (median of {args.repeats})\n")
    print(to_markdown(rows, samples))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": command, "machine": info, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
