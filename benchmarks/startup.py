"""How long ``siam serve`` takes from launch to ``/health/ready``, as a user starts it (default settings).

Two kinds of start, alternating, each ``--repeats`` times (medians and spread reported):

* **first** on a machine: an empty chunk-size cache, so the service measures its best chunk size
  (``SIAM_CHUNK_ROWS=auto``) and remembers it;
* **later**: the cache filled by an earlier start, so that measurement is read back.

Both use the checkpoint's own ``model.onnx`` (exported from these very weights) and warm up before
turning ready. Readiness is polled every 20 ms.

    python -m benchmarks.startup checkpoints/resnet20-pgd7 --repeats 3
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import describe, save_results, summary_line
from benchmarks.servers import ServerProcess, SystemSpec
from service.settings import DEFAULT_CHECKPOINT


def ready_seconds(checkpoint: Path, tuning_cache: Path, extra: list[str]) -> float:
    spec = SystemSpec("siam", ["service.cli", str(checkpoint), "--port", "{port}", "--log-level", "warning", *extra],
                      "/health/ready", "query")
    server = ServerProcess(spec, ready_timeout_s=180, env={"SIAM_TUNING_CACHE": str(tuning_cache)}, poll_s=0.02)
    with server:
        return server.startup_s


def summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "runs_s": [round(t, 3) for t in times]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--repeats", type=int, default=3, help="starts of each kind (default: %(default)s)")
    p.add_argument("--serve-args", default="", help="extra `siam serve` flags, e.g. '--threads 1'")
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    command = "python -m benchmarks.startup " + shlex.join(argv)
    info = describe(torch.device("cpu"))
    print(f"{command}\nmachine: {summary_line(info)}", flush=True)
    extra = shlex.split(args.serve_args)
    first, later = [], []
    with tempfile.TemporaryDirectory(prefix="siam-startup-") as tmp:
        warm_cache = Path(tmp) / "warm.json"
        ready_seconds(args.checkpoint, warm_cache, extra)  # fills the cache that the later starts read
        for i in range(args.repeats):
            first.append(ready_seconds(args.checkpoint, Path(tmp) / f"cold-{i}.json", extra))
            later.append(ready_seconds(args.checkpoint, warm_cache, extra))
            print(f"  start {i + 1}: first {first[-1]:.2f} s, later {later[-1]:.2f} s", flush=True)
    results = {"command": command, "machine": info, "checkpoint": str(args.checkpoint),
               "first_start": summary(first), "later_start": summary(later)}
    print(f"ready in: first start {results['first_start']['median_s']:.2f} s (median of {args.repeats}), "
          f"later starts {results['later_start']['median_s']:.2f} s")
    save_results(results, args.output)
    return results


if __name__ == "__main__":
    main()
