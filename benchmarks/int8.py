"""int8 against fp32 on the CPU: noisy rows per second, and accuracy clean and under a transferred attack.

Both graphs run on ONNX Runtime's CPU provider through the service's own backend (noise in the graph,
chunks of ``--chunk-rows``), measured in the same run, alternating, best of ``--rounds``. Accuracy on
``--images`` JPEG test images at m = ``--samples``: clean, and under EOT PGD (``--eot`` noise draws per
gradient, 7 steps of 2/255, eps 8/255) crafted on the fp32 PyTorch model and *transferred* to both
graphs (the int8 graph has no gradient): a white-box attack on the int8 graph itself could be
stronger. Also the share of images on which the two answer the same label.

    python -m benchmarks.int8 checkpoints/resnet20-pgd7 --images 500 --threads 2

Writes ``int8.json`` and ``int8.md`` into ``--output`` (default ``<checkpoint>/eval/int8``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.machine import describe, summary_line
from models.checkpoint import load_checkpoint
from models.smooth import Smooth, summarize
from service.backends import load_backend
from service.settings import Settings
from training.attacks import pgd
from training.data import add_data_arguments, load_split, to_float
from training.measure import clopper_pearson


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    add_data_arguments(p)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--samples", type=int, default=16, help="m for the accuracy (default: %(default)s)")
    p.add_argument("--eot", type=int, default=8)
    p.add_argument("--chunk-rows", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5, help="speed rounds per precision (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per speed round (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    return p


def rows_per_s(backend: Any, seconds: float, size: int, rows: int) -> float:
    images = torch.rand(1, 3, size, size)
    backend.logits(images, [rows], [None])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        backend.logits(images, [rows], [None])
        done += rows
    return done / (time.perf_counter() - start)


def entry(flags: torch.Tensor) -> dict[str, Any]:
    k, n = int(flags.sum()), int(flags.numel())
    return {"value": k / n, "ci95": list(clopper_pearson(k, n))}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint)
    settings = {p: Settings(checkpoint=checkpoint, backend="onnx", precision=p, threads=args.threads,  # type: ignore[arg-type]
                            chunk_rows=args.chunk_rows) for p in ("fp32", "int8")}
    backends = {p: load_backend(s)[0] for p, s in settings.items()}
    model, manifest = load_checkpoint(checkpoint)
    size = manifest.spec.architecture.input_size
    speed: dict[str, list[float]] = {p: [] for p in backends}
    for _ in tqdm(range(args.rounds), desc="speed", unit="round"):
        for precision, backend in backends.items():  # alternating, so drifts in the machine hit both alike
            speed[precision].append(rows_per_s(backend, args.seconds, size, args.chunk_rows))

    test = load_split(args.data, "test", args.cache_dir).subset(args.images, seed=args.seed)
    torch.manual_seed(args.seed)
    smooth = Smooth(model, manifest.spec.smoothing, manifest.spec.architecture.num_classes)
    labels: dict[tuple[str, str], list[torch.Tensor]] = {}
    for i in tqdm(range(0, len(test), 100), desc="accuracy", unit="batch"):
        x, y = to_float(test.images[i:i + 100]), test.labels[i:i + 100]
        adv = pgd(smooth.forward_noisy, x, y, eot=args.eot)
        for attack, images in (("clean", x), ("eot-pgd (transferred)", adv)):
            labels.setdefault((attack, "truth"), []).append(y)
            for precision, backend in backends.items():
                logits = backend.logits(images, [args.samples] * len(y), [None] * len(y))
                predicted = torch.tensor([p.label for p in summarize(logits, [args.samples] * len(y),
                                                                     manifest.spec.smoothing.aggregation)])
                labels.setdefault((attack, precision), []).append(predicted)
    accuracy = {}
    for attack in ("clean", "eot-pgd (transferred)"):
        truth = torch.cat(labels[(attack, "truth")])
        fp32, int8 = torch.cat(labels[(attack, "fp32")]), torch.cat(labels[(attack, "int8")])
        accuracy[attack] = {"fp32": entry(fp32 == truth), "int8": entry(int8 == truth),
                            "same_label": entry(fp32 == int8)}
    report = {
        "command": "python -m benchmarks.int8 " + shlex.join(sys.argv[1:] if argv is None else argv),
        "model": manifest.name, "machine": describe(torch.device("cpu")), "threads": torch.get_num_threads(),
        "chunk_rows": args.chunk_rows, "samples": args.samples, "images": len(test),
        "providers": {p: b.describe().get("provider") for p, b in backends.items()},
        "rows_per_s": {p: {"best": max(v), "all": v} for p, v in speed.items()},
        "speedup": max(speed["int8"]) / max(speed["fp32"]), "accuracy": accuracy,
    }
    out = Path(args.output) if args.output else checkpoint / "eval" / "int8"
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8.json").write_text(json.dumps(report, indent=2) + "\n")

    def pct(e: dict[str, Any]) -> str:
        return f"{100 * e['value']:.1f} [{100 * e['ci95'][0]:.1f}, {100 * e['ci95'][1]:.1f}]"

    lines = [f"### {manifest.name}: int8 against fp32 (ONNX Runtime, {report['providers']['int8']})", "",
             f"`{report['command']}`; {summary_line(report['machine'])}, {report['threads']} threads.", "",
             f"Noisy rows/s, chunks of {args.chunk_rows}, best of {args.rounds} alternating rounds: fp32 "
             f"{report['rows_per_s']['fp32']['best']:.0f}, int8 {report['rows_per_s']['int8']['best']:.0f} "
             f"(**{report['speedup']:.2f}x**).", "",
             f"Accuracy at m = {args.samples} on {len(test)} test images (attack crafted on the fp32 model):", "",
             "| images | fp32 | int8 | same label |", "|---|---|---|---|"]
    lines += [f"| {a} | {pct(r['fp32'])} | {pct(r['int8'])} | {pct(r['same_label'])} |" for a, r in accuracy.items()]
    markdown = "\n".join(lines) + "\n"
    (out / "int8.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
