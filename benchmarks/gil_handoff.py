"""What a call that releases the GIL costs a thread that shares the interpreter with a busy one.

Under load the service has two busy Python threads: the event loop (HTTP, parsing, decoding) and the
model thread (batching, answers). Each torch call releases the GIL; when the other thread is waiting for
it, the caller waits in turn until that thread gives it back, up to a switch interval (5 ms by default).
A few microseconds of work can then cost milliseconds. This times a few operations on serving-sized
arrays alone, then beside a thread that runs pure Python, and prints both.

    python -m benchmarks.gil_handoff --calls 300
"""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.load import png_image
from benchmarks.machine import describe, summary_line
from service.images import decode_image, to_batch, unit_floats


def operations() -> dict[str, Callable[[], object]]:
    """Serving-sized work, each as torch calls and as NumPy: one image's pixels to floats, a batch of 32
    images made one tensor, and 32 answers' logits split per request."""
    png = png_image(0)
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    images = [torch.rand(1, 3, 32, 32) for _ in range(32)]
    arrays = [image.numpy() for image in images]
    logits = torch.rand(32, 10)
    return {
        "pixels to floats, torch (permute, float, div_)": lambda: torch.from_numpy(pixels).permute(2, 0, 1).float()
        .div_(255),
        "pixels to floats, NumPy (the service's unit_floats)": lambda: unit_floats(pixels.transpose(2, 0, 1)),
        "decode_image + to_batch (the service's, one PNG)": lambda: to_batch([decode_image(png, 32, False)]),
        "32 images to one batch, torch.cat": lambda: torch.cat(images),
        "32 images to one batch, a select each + torch.stack": lambda: torch.stack([image[0] for image in images]),
        "32 images to one batch, np.concatenate": lambda: np.concatenate(arrays),
        "split 32 rows of logits, Tensor.split": lambda: logits.split([1] * 32),
    }


def time_each(calls: int) -> dict[str, float]:
    """Mean seconds per call of each operation (a mean, not a median: the waits are what is measured)."""
    out = {}
    for name, operation in operations().items():
        operation()
        start = time.perf_counter()
        for _ in range(calls):
            operation()
        out[name] = (time.perf_counter() - start) / calls
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gil_handoff", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=300, help="calls of each operation per measurement [300]")
    args = p.parse_args(argv)
    print("command: python -m benchmarks.gil_handoff " + shlex.join(sys.argv[1:] if argv is None else argv))
    print("machine: " + summary_line(describe(torch.device("cpu"))) + f"; switch interval "
          f"{sys.getswitchinterval() * 1000:g} ms")
    alone = time_each(args.calls)
    stop = threading.Event()

    def busy() -> None:  # pure Python, as an event loop parsing requests is
        while not stop.is_set():
            sum(range(1000))

    other = threading.Thread(target=busy, name="gil-handoff-busy", daemon=True)
    other.start()
    try:
        beside = time_each(args.calls)
    finally:
        stop.set()
        other.join()
    width = max(map(len, alone))
    print(f"{'operation':{width}s}  {'alone':>10s}  {'beside a busy thread':>22s}")
    for name in alone:
        print(f"{name:{width}s}  {alone[name] * 1e6:8.1f} us  {beside[name] * 1e6:18.1f} us")


if __name__ == "__main__":
    main()
