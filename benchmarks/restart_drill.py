"""A fire drill for ``siam serve --workers N``: kill its processes while ``siam predict`` runs, count what is lost.

The service starts as shipped (``--workers 2``, one model process); ``siam predict``'s client sends test
images from the CIFAR-10 archive, ``--concurrency`` at a time, first with nothing killed (the baseline),
then again while this script sends SIGKILL to the processes ``--kills`` names, each at its time after the
run began: ``model`` (the model process) or ``http`` (an HTTP worker). It reports, for both runs, the images
answered and lost and the images per second, side by side, and for each kill how long the service took to
answer again (the model process: until ``/health/ready`` says ready; a worker: until the supervisor logs its
successor) and the 503 answers the client retried. The true label of every image of the first run goes to
``POST /feedback`` before the kills; after them, those of the second run, whose ids were issued by model
processes that were then killed, must still take their feedback (they are signed, not kept by the process
that died), and those of the first run, sent again, must be refused: the service runs with
``--feedback-db``, so which answers had feedback outlives the model process (``--no-feedback-db`` shows
what happens without it).

    python -m benchmarks.restart_drill --images 2000 --kills model@3,http@8,model@13
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.machine import describe, save_results, summary_line
from benchmarks.servers import ServerProcess, service_spec
from models.cli_types import positive_int
from service.client import Answer, Client
from service.settings import DEFAULT_CHECKPOINT, DEFAULT_ONNX_CACHE

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
STARTED = re.compile(r"model process (\d+), \d+ HTTP workers \(([\d, ]+)\)")
RESTARTED = re.compile(r"(siam-model|siam-http-\d+) exited with status -?\d+: restarted as process (\d+)")


def test_images(archive: Path, count: int, into: Path) -> list[Path]:
    """The first ``count`` JPEG test images of the archive, written under ``into``."""
    paths: list[Path] = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile() and member.name.startswith("test/") and member.name.endswith(".jpg"):
                tar.extract(member, into, filter="data")
                paths.append(into / member.name)
                if len(paths) == count:
                    break
    return sorted(paths)


def parse_kills(text: str) -> list[tuple[str, float]]:
    kills = []
    for item in filter(None, text.split(",")):
        kind, _, at = item.partition("@")
        if kind not in ("model", "http") or not at:
            raise argparse.ArgumentTypeError(f"{item!r}: expected model@SECONDS or http@SECONDS")
        kills.append((kind, float(at)))
    return sorted(kills, key=lambda k: k[1])


def errors_by_kind(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.findall(r'^siam_errors_total\{kind="(\w+)"\} ([\d.e+]+)$', text, re.M)
    return {kind: float(value) for kind, value in found}


def run_client(url: str, paths: list[Path], samples: int, concurrency: int) -> tuple[dict[str, Any], list[Answer]]:
    client = Client(url, timeout=60.0, retries=5)
    started = time.perf_counter()
    answers = list(client.predict_files(paths, samples, concurrency=concurrency))
    seconds = time.perf_counter() - started
    client.close()
    lost = [a for a in answers if a.body is None]
    return {"images": len(paths), "answered": len(paths) - len(lost), "lost": len(lost), "seconds": round(seconds, 2),
            "images_per_s": round(len(paths) / seconds, 1), "errors": sorted({str(a.error) for a in lost})[:5]}, answers


def send_feedback(url: str, answers: list[Answer]) -> dict[str, Any]:
    """The true label (the image's folder) of every answered image to ``POST /feedback``; what was accepted,
    and the accuracy the accepted answers say."""
    with httpx.Client(timeout=30.0) as http:
        classes = http.get(f"{url}/v1/models").json()["models"][0]["spec"]["class_names"]
        replies = [http.post(f"{url}/feedback", json={"id": a.body["id"], "label": classes.index(a.path.parent.name)})
                   for a in answers if a.body is not None]
    correct = [r.json()["correct"] for r in replies if r.status_code == 200]
    return {"sent": len(replies), "accepted": len(correct), "refused": len(replies) - len(correct),
            "accuracy_from_feedback": round(sum(correct) / max(len(correct), 1), 4)}


def pids(server: ServerProcess) -> tuple[int, list[int]]:
    """The model process and the workers now running, from the supervisor's log."""
    log = server.output()
    first = STARTED.search(log)
    assert first, log[-2000:]
    model, workers = int(first.group(1)), [int(p) for p in first.group(2).split(", ")]
    for name, pid in RESTARTED.findall(log):
        if name == "siam-model":
            model = int(pid)
        else:
            workers[int(name.rsplit("-", 1)[1])] = int(pid)
    return model, workers


def kill_on_schedule(server: ServerProcess, kills: list[tuple[str, float]], began: float,
                     record: list[dict[str, Any]]) -> None:
    for n, (kind, at) in enumerate(kills):
        time.sleep(max(0.0, began + at - time.perf_counter()))
        model, workers = pids(server)
        pid = model if kind == "model" else workers[n % len(workers)]
        restarts_before = len(RESTARTED.findall(server.output()))
        os.kill(pid, signal.SIGKILL)
        killed = time.perf_counter()
        while len(RESTARTED.findall(server.output())) == restarts_before:
            time.sleep(0.01)
        if kind == "model":  # answering again once the workers are ready (either one answers the check)
            while True:
                try:
                    if httpx.get(f"{server.url}/health/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
        record.append({"kind": kind, "pid": pid, "at_s": at, "back_after_s": round(time.perf_counter() - killed, 2)})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.restart_drill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, nargs="?", default=DEFAULT_CHECKPOINT)
    p.add_argument("--images", type=positive_int, default=2000, help="test images per run (default: %(default)s)")
    p.add_argument("--samples", type=positive_int, default=16, help="m per request (default: %(default)s)")
    p.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight (default: %(default)s)")
    p.add_argument("--workers", type=positive_int, default=2, help="HTTP worker processes (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=2, help="model threads (default: %(default)s)")
    p.add_argument("--kills", type=parse_kills, default=parse_kills("model@3,http@8,model@13"),
                   help="what to kill when, seconds after the run began (default: model@3,http@8,model@13)")
    p.add_argument("--data", type=Path, default=ARCHIVE, help="the JPEG CIFAR-10 archive (default: %(default)s)")
    p.add_argument("--feedback-db", action=argparse.BooleanOptionalAction, default=True,
                   help="run the service with a feedback file (default: %(default)s); without it, the killed model "
                        "process's memory of which answers had feedback is lost")
    p.add_argument("--output", type=Path, default=None, help="write the results here as JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    info = describe(torch.device("cpu"))
    command = "python -m benchmarks.restart_drill " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"{command}\n{summary_line(info)}", flush=True)
    spec = service_spec(args.checkpoint, args.threads, "onnx", "cpu", DEFAULT_ONNX_CACHE, workers=args.workers)
    with tempfile.TemporaryDirectory(prefix="siam-drill-") as folder:
        # the supervisor's log names the processes and their restarts
        spec.args += ["--log-level", "info"]
        if args.feedback_db:
            spec.args += ["--feedback-db", str(Path(folder, "feedback.sqlite"))]
        with ServerProcess(spec) as server:
            results = run_drill(server, args, Path(folder))
    save_results({"command": command, "machine": info, "feedback_db": args.feedback_db, **results}, args.output)


def run_drill(server: ServerProcess, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The two runs, the kills and the feedback of :func:`main`, on a started service."""
    paths = test_images(args.data, args.images, folder)
    baseline, first_answers = run_client(server.url, paths, args.samples, args.concurrency)
    print(f"nothing killed: {baseline}", flush=True)
    before = send_feedback(server.url, first_answers)
    print(f"feedback for the answers of the first run: {before}", flush=True)
    refused_before = errors_by_kind(server.url)
    kills: list[dict[str, Any]] = []
    killer = threading.Thread(target=kill_on_schedule, args=(server, args.kills, time.perf_counter(), kills))
    killer.start()
    drill, answers = run_client(server.url, paths, args.samples, args.concurrency)
    killer.join()
    for kill in kills:  # a kill after the last answer tests nothing: say so
        kill["during_run"] = kill["at_s"] + kill["back_after_s"] < drill["seconds"]
    refused = {k: v - refused_before.get(k, 0.0) for k, v in errors_by_kind(server.url).items()
               if v > refused_before.get(k, 0.0)}
    print(f"with kills:     {drill}\nkills: {kills}\nrefused meanwhile (retried by the client): {refused}")
    print(f"images/s with kills over without: {drill['images_per_s'] / baseline['images_per_s']:.2f}x")
    feedback = send_feedback(server.url, answers)
    print(f"feedback after the kills, for the answers of the second run: {feedback}")
    again = send_feedback(server.url, first_answers)
    print(f"feedback after the kills, again for the answers of the first run: {again}")
    return {"baseline": baseline, "drill": drill, "kills": kills, "refused_during_drill": refused,
            "feedback_before_kills": before, "feedback_after_kills": feedback, "feedback_again_after_kills": again}


if __name__ == "__main__":
    main()
