"""The load generator: closed-loop clients over keep-alive HTTP/1.1, in a process of its own.

Each of ``concurrency`` clients holds one connection and sends its next request as soon as the last
answer arrived. The client is a few lines over asyncio streams (uvloop when installed) rather than
httpx, because on a 2-core machine the load generator shares the CPU with the server it measures:
the lighter it is, the more of the machine the server gets. Throughput counts the answers that arrive
inside the measured window (after the warm-up); latencies are those answers'. Requests still in flight
at the end are awaited, so the next measurement starts on an idle server, but not counted.

The rate is not "answers in the window / window": when a server answers its clients in rounds (64
clients x 16 copies is one batch), answers arrive in bursts and that count jumps by a whole round.
Each client instead reports the span from sending its first counted request to receiving its last,
which holds exactly its ``k`` counted answers back to back; the rate is the sum of ``k / span``.

``python -m benchmarks.load URL --samples 16 --concurrency 8 --duration 4`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np


@dataclass
class LoadResult:
    """What one load run measured; latencies in milliseconds."""

    url: str
    samples: int
    concurrency: int
    duration_s: float
    completed: int = 0
    errors: int = 0
    predictions_per_s: float = 0.0
    rows_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    first_error: str | None = None
    confidence: float | None = None  # sequential sampling: samples is then the budget
    mean_samples_used: float | None = None  # from the answers, when confidence is set
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    spans: list[tuple[int, float]] = field(default_factory=list, repr=False)  # per client: (answers, seconds)
    samples_used: list[int] = field(default_factory=list, repr=False)


def closed_loop_rate(spans: list[tuple[int, float]]) -> float:
    """Answers per second of closed-loop callers, each given as (answers counted, seconds from sending the
    first of them to receiving the last): exact for back-to-back requests, whatever the window's edges."""
    return sum(count / seconds for count, seconds in spans if count and seconds > 0)


def png_image(seed: int = 0, size: int = 32) -> bytes:
    """A random RGB PNG of CIFAR's size (the model's speed does not depend on the pixels)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()


def build_request(url: str, samples: int, body_style: str, image: bytes, confidence: float | None = None) -> bytes:
    """One raw HTTP/1.1 POST: JSON ``{"image": base64}`` with ``?samples=`` (``query``) or with
    ``"samples"`` inside the JSON (``json``, for servers that only see the body, like LitServe)."""
    parts = urlsplit(url)
    body: dict[str, object] = {"image": base64.b64encode(image).decode()}
    path = parts.path or "/"
    if body_style == "query":
        path += f"?samples={samples}" + (f"&confidence={confidence}" if confidence is not None else "")
    elif confidence is not None:
        raise ValueError("confidence goes in the query string: only the siam service takes it")
    else:
        body["samples"] = samples
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode() + payload


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response (Content-Length or chunked)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    status = int(status_line.split()[1])
    length, chunked = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length)
    body = bytearray()
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()
            return status, bytes(body)
        body += await reader.readexactly(size)
        await reader.readline()


async def client(host: str, port: int, requests: list[bytes], window: tuple[float, float], result: LoadResult,
                 timeout_s: float, offset: int = 0) -> None:
    """One closed-loop client: send, wait, record, repeat until the window closes. It goes round
    ``requests`` from ``offset`` (one image each), so that clients do not send the same image at once."""
    start, end = window
    count, first_sent, last_done = 0, 0.0, 0.0
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for i in itertools.count(offset):
            if (sent := time.perf_counter()) >= end:
                break
            writer.write(requests[i % len(requests)])
            status, body = await asyncio.wait_for(read_response(reader), timeout_s)
            done = time.perf_counter()
            if not start <= done <= end:
                continue
            if status == 200:
                result.completed += 1
                result.latencies_ms.append((done - sent) * 1000)
                first_sent = first_sent if count else sent
                count, last_done = count + 1, done
                if result.confidence is not None:
                    result.samples_used.append(int(json.loads(body)["samples_used"]))
            else:
                result.errors += 1
                result.first_error = result.first_error or f"HTTP {status}: {body[:200].decode(errors='replace')}"
    finally:
        writer.close()
        result.spans.append((count, last_done - first_sent))


async def run_load(url: str, samples: int, concurrency: int, duration_s: float, warmup_s: float,
                   body_style: str = "query", timeout_s: float = 60.0, images: list[bytes] | None = None,
                   confidence: float | None = None) -> LoadResult:
    """Closed-loop load for ``warmup_s + duration_s`` seconds; rates count the last ``duration_s`` only.
    Without ``images`` every request carries one random PNG (the fixed-budget model's speed does not
    depend on the pixels; sequential sampling's does, so give it real images)."""
    parts = urlsplit(url)
    requests = [build_request(url, samples, body_style, image, confidence) for image in images or [png_image()]]
    result = LoadResult(url, samples, concurrency, duration_s, confidence=confidence)
    start = time.perf_counter() + warmup_s
    window = (start, start + duration_s)
    spread = max(1, len(requests) // concurrency)
    outcomes = await asyncio.gather(*(client(parts.hostname or "127.0.0.1", parts.port or 80, requests, window,
                                             result, timeout_s, i * spread) for i in range(concurrency)),
                                    return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        result.errors += len(failures)
        result.first_error = result.first_error or f"{type(failures[0]).__name__}: {failures[0]}"
    summarize(result)
    return result


def summarize(result: LoadResult) -> None:
    """Rates and latency percentiles from what was recorded."""
    result.predictions_per_s = closed_loop_rate(result.spans)
    per_prediction = float(result.samples)
    if result.samples_used:  # sequential sampling: the copies the answers say they used
        per_prediction = result.mean_samples_used = float(np.mean(result.samples_used))
    result.rows_per_s = result.predictions_per_s * per_prediction
    if result.latencies_ms:
        lat = np.asarray(result.latencies_ms)
        result.p50_ms, result.p90_ms, result.p99_ms = (float(np.percentile(lat, q)) for q in (50, 90, 99))
        result.max_ms = float(lat.max())


def run_in_process(url: str, samples: int, concurrency: int, duration_s: float, warmup_s: float,
                   body_style: str = "query", images_dir: Path | None = None,
                   confidence: float | None = None) -> LoadResult:
    """Run the load generator in its own Python process (so it never shares an interpreter lock with
    what it measures) and return its result."""
    cmd = [sys.executable, "-m", "benchmarks.load", url, "--samples", str(samples), "--concurrency",
           str(concurrency), "--duration", str(duration_s), "--warmup", str(warmup_s), "--body", body_style]
    cmd += ["--images", str(images_dir)] if images_dir else []
    cmd += ["--confidence", str(confidence)] if confidence is not None else []
    # The result comes back in a file, not on stdout: a result of over 128 KiB once came back from the pipe
    # with a line break inserted at 131,072 characters.
    with tempfile.TemporaryDirectory(prefix="siam-load-") as folder:
        result = Path(folder) / "result.json"
        done = subprocess.run([*cmd, "--result-file", str(result)], capture_output=True, text=True,
                              timeout=warmup_s + duration_s + 120)
        if done.returncode != 0 or not result.is_file():
            raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr[-2000:]}")
        return LoadResult(**json.loads(result.read_text()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="e.g. http://127.0.0.1:8000/predict")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    p.add_argument("--body", choices=["query", "json"], default="query", help="where samples goes")
    p.add_argument("--images", type=Path, default=None,
                   help="a folder of image files to send, in turn (default: one random PNG)")
    p.add_argument("--confidence", type=float, default=None,
                   help="sequential sampling at this confidence (siam only); --samples is the budget")
    p.add_argument("--result-file", type=Path, default=None, help="write the result's JSON here, not to stdout")
    args = p.parse_args(argv)
    images = [f.read_bytes() for f in sorted(args.images.iterdir()) if f.is_file()] if args.images else None
    if args.images and not images:
        p.error(f"no image files in {args.images}")
    load = run_load(args.url, args.samples, args.concurrency, args.duration, args.warmup, args.body,
                    images=images, confidence=args.confidence)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(load)
    else:
        result = uvloop.run(load)
    text = json.dumps(asdict(result))
    if args.result_file is None:
        print(text)
    else:
        args.result_file.write_text(text + "\n")


if __name__ == "__main__":
    main()
