"""``siam predict``: send images (files or folders) to a running ``siam serve`` and print the answers.

Each image goes as its own request (raw PNG/JPEG bytes), several at a time, so the service batches
their noisy copies together. A 503 (queue full, loading, draining) is retried after
the server's ``Retry-After``, up to ``--retries`` times, and so is a request whose connection broke before
its answer came (a restarting worker or service); a 429 (rate limit) is retried after the exact wait the
service names, for up to ``--timeout`` seconds of waiting per image; any other error is reported for that image
and the rest go on, except the two that every image would meet: no service at ``--url``, and a refused
API key (``--api-key``, or the ``SIAM_API_KEY`` environment variable), which stop the run at once.
Output (``--format``): a table row per image (path, class, vote share, top probability), JSON lines, or
CSV; a progress bar on the terminal's stderr; exit status 1 when any image got no answer.

    siam predict photos/ --samples 64
    siam predict photos/ --samples 256 --confidence 0.999 --format csv > answers.csv
    siam predict test/cat/0000.jpg --url http://gpu-host:8000 --certify --format json > answers.jsonl

From Python, :class:`Client` (threads) and :class:`AsyncClient` (asyncio) do the same per image.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import ssl
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
RETRIED = frozenset({429, 503})  # "not now": retried after the wait the service asks for
RESENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
"""The connection broke before an answer came (a worker or the whole service restarting). A prediction changes
nothing on the server, so it is sent again, after a backoff from :data:`BROKEN_WAIT_S`. A read timeout is not
among them: the service may still be computing that answer, and a second copy would only add to its load."""
BROKEN_WAIT_S = 0.5
MAX_WAIT_S = 30.0  # the longest one wait between two tries, whatever the server asks


@dataclass(frozen=True)
class Answer:
    """The service's answer for one file, or why there is none."""

    path: Path
    body: dict[str, Any] | None
    error: str | None = None
    status: int | None = None  # the HTTP status of a refusal; None when answered or when no answer came back


def image_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """The PNG/JPEG files named, and those under the folders named (sorted), in order."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")


def content_type(path: Path) -> str:
    return SUFFIXES.get(path.suffix.lower(), "image/png")


def retry_after_s(header: str | None, default: float = 1.0, cap: float = MAX_WAIT_S) -> float:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds; an HTTP date or junk waits ``default``)."""
    try:
        return min(max(float(header), 0.0), cap) if header else default
    except ValueError:
        return default


def wait_of(r: httpx.Response) -> float:
    """Seconds the service asked this client to wait: a 429's exact ``retry_after_s`` when its body has one,
    else ``Retry-After``. The header counts whole seconds, so under a 5 requests/s limit it says 1 s for a
    token due in 0.2 s, and 40 images took 14-15 s where 7 s would do."""
    try:
        body = r.json()
    except ValueError:
        body = None
    exact = body.get("retry_after_s") if isinstance(body, dict) else None
    if isinstance(exact, int | float) and not isinstance(exact, bool):
        return min(max(float(exact), 0.0), MAX_WAIT_S)
    return retry_after_s(r.headers.get("retry-after"))


def backoff_s(wait_s: float, attempt: int, cap: float = MAX_WAIT_S) -> float:
    """Seconds before retry ``attempt`` (0 for the first): ``wait_s`` (what the server asked for, or a default),
    doubled for each earlier retry and stretched by a random factor of 1 to 2. Without the spread, clients
    refused together came back together: eight threads under a 5 requests/s limit lost 3 and 6 of 40 images
    in two runs."""
    return min(wait_s * 2**attempt * (1.0 + random.random()), cap)


class Retrying:
    """When one request is sent again, and after how long; :class:`Client` and :class:`AsyncClient` share it.

    A 503 or a broken connection is retried ``retries`` times, backing off (:func:`backoff_s`). A 429 is
    retried after the exact wait the service names, stretched by a random factor of 1 to 2 and never
    doubled, for as long as the waits add up to at most ``patience_s``, however many refusals that takes.
    Every thread of one client draws on the same bucket, so with 8 in flight under a 5 requests/s limit an
    image may be refused many times: counted against ``retries``, 3-4 of 40 images were lost each run, and
    doubling the exact wait took 11-18 s for the 40 where 8 s would do (the refusals are cheap: answered
    before the image is decoded).
    """

    def __init__(self, retries: int, patience_s: float):
        self.retries, self.patience_s = retries, patience_s
        self.tries = 0
        self.waited_s = 0.0

    def after_broken(self) -> float | None:
        """The wait before sending again a request whose connection broke, or None to give up."""
        return self._spend(backoff_s(BROKEN_WAIT_S, self.tries))

    def after(self, r: httpx.Response) -> float | None:
        """The wait before sending ``r``'s request again, or None when ``r`` is the answer to give."""
        if r.status_code == 429:
            wait = wait_of(r) * (1.0 + random.random())
            if self.waited_s + wait > self.patience_s:
                return None
            self.waited_s += wait
            return wait
        return self._spend(backoff_s(wait_of(r), self.tries)) if r.status_code in RETRIED else None

    def _spend(self, wait: float) -> float | None:
        if self.tries >= self.retries:
            return None
        self.tries += 1
        return wait


def request_params(samples: int | None, certify: bool, confidence: float | None) -> dict[str, Any]:
    """The query string of ``POST /predict``; unset options are left to the service's defaults."""
    params: dict[str, Any] = {"certify": "true"} if certify else {}
    if samples is not None:
        params["samples"] = samples
    if confidence is not None:
        params["confidence"] = confidence
    return params


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def trust(cacert: str | Path | None) -> ssl.SSLContext | bool:
    """What HTTPS answers to believe: the system's authorities, or only the certificate(s) in ``cacert`` (a
    service started with its own certificate, ``siam serve --ssl-certfile``)."""
    return ssl.create_default_context(cafile=str(cacert)) if cacert else True


def failed(path: Path, e: httpx.HTTPError | OSError) -> Answer:
    status = e.response.status_code if isinstance(e, httpx.HTTPStatusError) else None
    return Answer(path, None, str(e), status)


def answer_of(r: httpx.Response) -> dict[str, Any]:
    """The JSON answer, or ``httpx.HTTPStatusError`` carrying the service's ``detail``."""
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise httpx.HTTPStatusError(f"{r.status_code}: {detail}", request=r.request, response=r)
    return r.json()


class Client:
    """A small client for ``POST /predict`` that honours ``Retry-After`` and sends an API key if given."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0, retries: int = 5,
                 api_key: str | None = None, cacert: str | Path | None = None):
        self.url = url.rstrip("/")
        self.retries = retries
        self.patience_s = timeout  # the most one image waits on a rate limit, in all
        self.http = httpx.Client(timeout=timeout, headers=auth_headers(api_key), verify=trust(cacert))

    def predict_bytes(self, data: bytes, content_type: str, samples: int | None = None,
                      certify: bool = False, confidence: float | None = None) -> dict[str, Any]:
        """The answer to one image; raises ``httpx.HTTPStatusError`` once retries are spent."""
        params = request_params(samples, certify, confidence)
        retrying = Retrying(self.retries, self.patience_s)
        while True:
            try:
                r = self.http.post(f"{self.url}/predict", params=params, content=data,
                                   headers={"content-type": content_type})
            except RESENT:
                if (wait := retrying.after_broken()) is None:
                    raise
            else:
                if (wait := retrying.after(r)) is None:
                    return answer_of(r)
            time.sleep(wait)

    def predict_file(self, path: Path, samples: int | None = None, certify: bool = False,
                     confidence: float | None = None) -> Answer:
        try:
            body = self.predict_bytes(path.read_bytes(), content_type(path), samples, certify, confidence)
            return Answer(path, body)
        except (httpx.HTTPError, OSError) as e:
            return failed(path, e)

    def predict_files(self, paths: Iterable[Path], samples: int | None = None, certify: bool = False,
                      concurrency: int = 8, confidence: float | None = None) -> Iterator[Answer]:
        """Answers in the order of ``paths``, ``concurrency`` requests in flight. Closing the iterator early
        sends no more requests (those in flight finish)."""
        pool = ThreadPoolExecutor(max(concurrency, 1))
        try:
            yield from pool.map(lambda p: self.predict_file(p, samples, certify, confidence), paths)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def check_reachable(self) -> None:
        """Raise ``httpx.TransportError`` unless something answers HTTP at the URL (``/health/live``, which
        needs no key): a run of many images then stops at once instead of failing each one alike."""
        self.http.get(f"{self.url}/health/live", timeout=min(self.http.timeout.connect or 10.0, 10.0))

    def close(self) -> None:
        self.http.close()


class AsyncClient:
    """:class:`Client` for asyncio: the same requests and retries, awaited."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0, retries: int = 5,
                 api_key: str | None = None, cacert: str | Path | None = None):
        self.url = url.rstrip("/")
        self.retries = retries
        self.patience_s = timeout  # the most one image waits on a rate limit, in all
        self.http = httpx.AsyncClient(timeout=timeout, headers=auth_headers(api_key), verify=trust(cacert))

    async def predict_bytes(self, data: bytes, content_type: str, samples: int | None = None,
                            certify: bool = False, confidence: float | None = None) -> dict[str, Any]:
        """The answer to one image; raises ``httpx.HTTPStatusError`` once retries are spent."""
        params = request_params(samples, certify, confidence)
        retrying = Retrying(self.retries, self.patience_s)
        while True:
            try:
                r = await self.http.post(f"{self.url}/predict", params=params, content=data,
                                         headers={"content-type": content_type})
            except RESENT:
                if (wait := retrying.after_broken()) is None:
                    raise
            else:
                if (wait := retrying.after(r)) is None:
                    return answer_of(r)
            await asyncio.sleep(wait)

    async def predict_file(self, path: Path, samples: int | None = None, certify: bool = False,
                           confidence: float | None = None) -> Answer:
        try:
            body = await self.predict_bytes(path.read_bytes(), content_type(path), samples, certify, confidence)
            return Answer(path, body)
        except (httpx.HTTPError, OSError) as e:
            return failed(path, e)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


CSV_COLUMNS = ("path", "label", "class_name", "vote_share", "probability", "samples", "samples_used", "radius",
               "abstained", "error")


def csv_row(answer: Answer) -> dict[str, Any]:
    b = answer.body or {}
    top = max(b["probabilities"]) if b.get("probabilities") else None
    return {"path": str(answer.path), "label": b.get("label"), "class_name": b.get("class_name"),
            "vote_share": b.get("vote_share"), "probability": top, "samples": b.get("samples"),
            "samples_used": b.get("samples_used"), "radius": b.get("radius"), "abstained": b.get("abstained"),
            "error": answer.error}


def line(answer: Answer) -> str:
    if answer.body is None:
        return f"{answer.path}\tERROR\t{answer.error}"
    b = answer.body
    top = max(b["probabilities"]) if b.get("probabilities") else float("nan")
    text = f"{answer.path}\t{b.get('class_name') or b['label']}\tvote_share={b['vote_share']:.3f}\tp={top:.3f}"
    if b.get("radius") is not None:
        text += f"\tradius={b['radius']:.4f}" + ("\tabstained" if b.get("abstained") else "")
    if b.get("samples_used") is not None:
        text += f"\tsamples_used={b['samples_used']}" + ("" if b.get("decided") else "\tundecided")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="siam predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="PNG/JPEG files, or folders searched for them")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default: %(default)s)")
    p.add_argument("--samples", type=int, default=None, help="noisy copies m (default: the model's)")
    p.add_argument("--certify", action="store_true", help="Cohen's CERTIFY: certified L2 radius, or abstain")
    p.add_argument("--confidence", type=float, default=None,
                   help="sequential sampling: --samples becomes the budget, each image stops once its vote is "
                        "decided at this confidence (e.g. 0.999)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    p.add_argument("--retries", type=int, default=5,
                   help="retries of a 503 (after Retry-After) or of a request whose connection broke; a 429 is "
                        "retried while its waits stay within --timeout (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("SIAM_API_KEY"),
                   help="the key of a service that has SIAM_API_KEYS (default: the SIAM_API_KEY environment "
                        "variable; on the command line it shows in the process list)")
    p.add_argument("--cacert", type=Path, default=None,
                   help="trust this certificate (PEM) for an HTTPS --url, e.g. the one the service was started "
                        "with (siam serve --ssl-certfile); default: the system's authorities")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds per request, and the most one image waits on a rate limit (default: %(default)s)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="a tab-separated row per image, JSON lines {path, answer, error}, or CSV with a header "
                        "(default: %(default)s)")
    p.add_argument("--json", action="store_const", const="json", dest="format", help="the same as --format json")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Checked here rather than with models.cli_types, whose package imports torch: the client stays light.
    for flag, value, ok, bound in (("--concurrency", args.concurrency, args.concurrency >= 1, ">= 1"),
                                   ("--retries", args.retries, args.retries >= 0, ">= 0"),
                                   ("--timeout", args.timeout, args.timeout > 0, "> 0"),
                                   ("--samples", args.samples, args.samples is None or args.samples >= 1, ">= 1")):
        if not ok:
            parser.error(f"argument {flag}: must be {bound}, got {value}")
    try:
        files = list(image_files(args.paths))
    except FileNotFoundError as e:
        raise SystemExit(f"siam predict: {e}") from e
    if not files:
        raise SystemExit("siam predict: no .png, .jpg or .jpeg files found")
    try:
        client = Client(args.url, args.timeout, args.retries, args.api_key, args.cacert)
    except (OSError, ssl.SSLError) as e:
        raise SystemExit(f"siam predict: --cacert {args.cacert}: {e}") from e
    try:
        client.check_reachable()
    except httpx.TransportError as e:
        client.close()
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            raise SystemExit(f"siam predict: the service at {args.url} has a certificate this machine does not "
                             f"trust ({e}); pass --cacert with the certificate it was started with") from e
        raise SystemExit(f"siam predict: no service answers at {args.url} ({e}); start one with `siam serve`, "
                         "or pass --url") from e
    unanswered = 0
    table = csv.DictWriter(sys.stdout, CSV_COLUMNS, lineterminator="\n") if args.format == "csv" else None
    if table:
        table.writeheader()
    answers = client.predict_files(files, args.samples, args.certify, args.concurrency, args.confidence)
    try:
        # The bar shows on a terminal only (stderr), so that piped output stays clean.
        for answer in tqdm(answers, total=len(files), unit="img", desc="siam predict", file=sys.stderr,
                           disable=None if len(files) > 1 else True, dynamic_ncols=True):
            if answer.status == 401:  # every image would meet it
                raise SystemExit(f"siam predict: the service refused the API key ({answer.error}); pass "
                                 "--api-key or set SIAM_API_KEY")
            unanswered += answer.body is None
            if table:
                table.writerow(csv_row(answer))
            elif args.format == "json":
                print(json.dumps({"path": str(answer.path), "answer": answer.body, "error": answer.error}))
            else:
                print(line(answer))
            sys.stdout.flush()
    finally:
        answers.close()
        client.close()
    if unanswered:
        print(f"siam predict: {unanswered} of {len(files)} images got no answer", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
