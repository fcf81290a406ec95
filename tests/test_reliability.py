"""Reliability and security: no 5xx from any input, decompression bombs, shutdown under load, goodput under
overload, a short soak, API keys and rate limits, and no file-system paths in answers.

The fuzzer's depth is ``SIAM_FUZZ_EXAMPLES`` cases per operation (60 in CI) and the soak's length
``SIAM_SOAK_S`` seconds (20 in CI); raise both for a longer hunt.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.specs.openapi import checks as st_checks
from service_helpers import Server, b64, image_bytes

from service import client as siam_predict
from service.app import create_app, without_paths
from service.auth import TokenBuckets, hash_key, read_key_hashes
from service.settings import Settings

FUZZ_EXAMPLES = int(os.environ.get("SIAM_FUZZ_EXAMPLES", "60"))
SOAK_S = float(os.environ.get("SIAM_SOAK_S", "20"))
PNG = image_bytes(0)


def app_settings(checkpoint: Path, **kw: object) -> Settings:
    base: dict[str, object] = {"checkpoint": checkpoint, "backend": "torch", "chunk_rows": 64, "threads": 1,
                               "max_samples": 64, "max_images": 4}
    return Settings(**(base | kw))  # type: ignore[arg-type]


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# --- the fuzzer --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed_server(checkpoint: Path) -> Iterator[Server]:
    with Server(checkpoint, "--backend", "torch", "--chunk-rows", "64", "--max-samples", "64",
                "--max-images", "4") as server:
        yield server


@pytest.fixture(scope="module")
def api(fuzzed_server: Server) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api")


@pytest.mark.subprocess
@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_from_the_fuzzer_gets_a_5xx_or_an_undocumented_answer(case: schemathesis.Case) -> None:
    """Schemathesis' generated and mutated requests against every documented operation: never a 5xx, and
    each status, content type, header and body as the OpenAPI document says. (Schema-valid requests may
    still be refused: the service's limits, such as ``samples <= max_samples``, are settings. A request
    uvicorn itself refuses as malformed HTTP never reaches the app, so its plain-text 400 is not an
    answer of this API.)"""
    response = case.call()
    if response.status_code == 400 and response.text == "Invalid HTTP request received.":
        return  # uvicorn's HTTP parser refused a malformed header before the app saw the request
    case.validate_response(response, excluded_checks=[
        st_checks.positive_data_acceptance, st_checks.negative_data_rejection, st_checks.ignored_auth,
        st_checks.missing_required_header])


# --- decompression bombs -----------------------------------------------------------------------------


def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit palette PNG of ``width`` x ``height`` black pixels: small on the wire, huge decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + one palette index per pixel
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"PLTE", b"\x00\x00\x00")
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = png_bomb(12000, 12000)
    assert len(data) < 200_000  # 144 million pixels in ~140 KB
    return data


@pytest.mark.parametrize(("side", "resize", "status"), [
    (12000, False, 413), (12000, True, 413),  # past Pillow's bomb limit (lowered by service/images.py)
    (3000, False, 422), (3000, True, 413),  # under it: the service's own header checks (size, max pixels)
])
def test_a_decompression_bomb_is_refused_from_its_header_in_milliseconds(checkpoint: Path, bomb: bytes,
                                                                        side: int, resize: bool,
                                                                        status: int) -> None:
    data = bomb if side == 12000 else png_bomb(side, side)
    cfg = app_settings(checkpoint, allow_resize=resize, max_body_bytes=1 << 20)
    with TestClient(create_app(cfg)) as client:
        client.post("/predict", content=PNG, headers={"content-type": "image/png"})  # warm the route
        times = []
        for _ in range(5):
            start = time.perf_counter()
            r = client.post("/predict", content=data, headers={"content-type": "image/png"})
            times.append(time.perf_counter() - start)
            assert r.status_code == status, r.text
            assert "pixels" in r.json()["detail"]
    # Decoding the 12000 x 12000 one takes ~0.6 s and 600 MB; reading its header, well under a millisecond.
    assert sorted(times)[2] < 0.05, times


@pytest.mark.subprocess
def test_bombs_do_not_hold_up_health_checks(checkpoint: Path, bomb: bytes, tmp_path: Path) -> None:
    """Twelve bombs at once (from curl processes, so the test's own GIL does not slow the checks) against a
    real server: /health/live answers as fast as without them."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("needs curl")
    bomb_file = tmp_path / "bomb.png"
    bomb_file.write_bytes(bomb)
    with Server(checkpoint, "--backend", "torch", "--chunk-rows", "64", "--allow-resize",
                "--max-body-bytes", str(1 << 20)) as server, httpx.Client(timeout=5) as client:
        def health(n: int) -> list[float]:
            times = []
            for _ in range(n):
                start = time.perf_counter()
                assert client.get(f"{server.url}/health/live").status_code == 200
                times.append(time.perf_counter() - start)
            return sorted(times)

        calm = health(30)
        senders = [subprocess.Popen([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                                     "Content-Type: image/png", "--data-binary", f"@{bomb_file}",
                                     f"{server.url}/predict"], stdout=subprocess.PIPE, text=True)
                   for _ in range(12)]
        loaded = health(30)
        codes = [p.communicate(timeout=30)[0] for p in senders]
    assert codes == ["413"] * 12, codes
    assert loaded[15] <= 2 * calm[15] + 0.005, (calm, loaded)
    assert loaded[-1] < 0.05 + calm[-1], (calm, loaded)


# --- shutdown under load -----------------------------------------------------------------------------


@pytest.mark.subprocess
def test_sigterm_under_load_answers_every_accepted_request_200_or_503(checkpoint: Path) -> None:
    """More accepted work than the grace period allows: what cannot finish gets 503 with Retry-After,
    shortly before uvicorn would cancel it (which answered 500); nothing is reset or lost."""
    with Server(checkpoint, "--backend", "torch", "--chunk-rows", "64", "--graceful-timeout-s", "1",
                "--max-samples", "1024") as server:
        def post(_: int) -> tuple[int, str]:
            try:
                r = httpx.post(f"{server.url}/predict?samples=1024", json={"image": b64(PNG)}, timeout=60)
                return r.status_code, r.headers.get("retry-after", "")
            except httpx.TransportError as e:
                return -1, type(e).__name__

        with ThreadPoolExecutor(8) as pool:
            pending = [pool.submit(post, i) for i in range(8)]
            deadline = time.monotonic() + 30
            while True:  # all eight accepted (queued or running) before the signal
                values = metric_values(httpx.get(f"{server.url}/metrics", timeout=5).text)
                if values[("siam_in_flight_requests", ())] >= 9:
                    break
                assert time.monotonic() < deadline, "the requests never got in flight"
                time.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in pending]
        statuses = Counter(status for status, _ in answers)
        assert set(statuses) <= {200, 503}, answers
        assert statuses[503] >= 1, f"8 x 1024 rows finished within a 1 s grace period? {answers}"
        assert all(retry for status, retry in answers if status == 503)
        assert server.proc.wait(30) in (0, -signal.SIGTERM)
        assert "unfinished requests answered 503" in server.output()


# --- goodput under overload --------------------------------------------------------------------------


async def open_loop(url: str, rate: float, seconds: float, samples: int) -> Counter[int]:
    """Requests started at a fixed rate whatever the answers (an open loop, as real traffic is)."""
    statuses: Counter[int] = Counter()
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        async def one() -> None:
            try:
                r = await client.post(f"{url}/predict?samples={samples}", json={"image": b64(PNG)})
                statuses[r.status_code] += 1
            except httpx.TransportError:
                statuses[-1] += 1

        tasks, start, n = [], time.perf_counter(), 0
        while (now := time.perf_counter() - start) < seconds:
            if now >= n / rate:
                tasks.append(asyncio.create_task(one()))
                n += 1
            else:
                await asyncio.sleep(min(0.002, n / rate - now))
        await asyncio.gather(*tasks)
    return statuses


@pytest.mark.subprocess
def test_goodput_under_twice_the_capacity_with_a_tight_deadline(checkpoint: Path) -> None:
    """Offered twice what the service can do, each request with a 0.3 s deadline: deadline-aware admission
    refuses what cannot be answered in time (503 at once) and spends the model on answers that arrive in
    time. Without it most requests answered 504 after the model had computed them anyway."""
    samples, seconds = 64, 6.0
    with Server(checkpoint, "--backend", "torch", "--chunk-rows", "64", "--request-timeout-s", "0.3",
                "--max-queue", "1024") as server:
        calm = asyncio.run(open_loop(server.url, 2, 2.0, samples))  # warm-up, and a sanity check (a third of capacity)
        assert calm[200] == sum(calm.values()), calm
        # Capacity at this m: one client in a closed loop, so that no request waits behind another and each is
        # admitted. (Four clients measured a tenth of it: refused at once and retrying at once, they sent
        # thousands of requests a second, whose handling took the 2 cores from the model.)
        for _ in range(3):  # a busy machine's window can answer next to nothing in time: a bounded retry
            done, start = 0, time.perf_counter()
            with httpx.Client(timeout=30) as client:
                while time.perf_counter() - start < seconds:
                    done += client.post(f"{server.url}/predict?samples={samples}",
                                        json={"image": b64(PNG)}).status_code == 200
            capacity = done / (time.perf_counter() - start)
            if done >= 10:
                break
        assert done >= 10, f"only {done} answers within 0.3 s in {seconds:.0f} s, three times"
        overload = asyncio.run(open_loop(server.url, 2 * capacity, seconds, samples))
    goodput = overload[200] / seconds
    assert set(overload) <= {200, 503, 504}, overload
    assert overload[503] > 0, f"twice the capacity was not an overload: {overload}"
    # Measured on 2 cores: goodput 0.93x to 1.29x the capacity in 9 runs of 10 (once 0.68x), 0 to 3 answers late
    # of 33 to 51 in time. Before admission weighed the requests waiting with a newcomer: 11 to 17 late of 26 to
    # 31 (3 runs); with that but no margin for its own misses: 5 to 10 late (4 runs).
    assert goodput >= 0.6 * capacity, f"goodput {goodput:.1f}/s vs capacity {capacity:.1f}/s: {overload}"
    assert overload[504] <= 0.15 * overload[200], f"too many admitted requests answered late: {overload}"


# --- soak --------------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.subprocess
def test_soak_keeps_memory_bounded_and_counters_consistent(checkpoint: Path) -> None:
    """Mixed traffic for SIAM_SOAK_S seconds (good requests, bad ones, clients that leave): the server's RSS
    stops growing after the first third, and its counters add up to what the clients saw."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the server's memory")
    bad = [("/predict", b"not json", "application/json"), ("/predict", b"\x89PNG broken", "image/png"),
           ("/predict", b"{}", "text/plain"), ("/v2/models/tiny/infer", b'{"inputs": []}', "application/json")]
    with Server(checkpoint, "--backend", "torch", "--chunk-rows", "64", "--max-images", "4") as server:
        pid = server.proc.pid
        seen: Counter[str] = Counter()
        images_answered = 0
        marks: list[int] = []
        start = time.perf_counter()
        with httpx.Client(timeout=30) as client:
            i = 0
            while (elapsed := time.perf_counter() - start) < SOAK_S:
                i += 1
                if i % 5 == 0:
                    path, body, kind = bad[i % len(bad)]
                    seen[str(client.post(server.url + path, content=body, headers={"content-type": kind})
                             .status_code)] += 1
                elif i % 17 == 0:  # a client that sends its request and leaves
                    with socket.create_connection(("127.0.0.1", server.port)) as s:
                        body = b'{"image": "' + b64(PNG).encode() + b'"}'
                        s.sendall(b"POST /predict?samples=64 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                    seen["left"] += 1
                else:
                    n = 1 + i % 4
                    r = client.post(f"{server.url}/predict?samples=8", json={"images": [b64(PNG)] * n})
                    assert r.status_code == 200, r.text
                    images_answered += n
                    seen["200"] += 1
                if len(marks) < int(3 * elapsed / SOAK_S):
                    marks.append(rss_kib(pid))
        marks.append(rss_kib(pid))
        deadline = time.monotonic() + 10
        while True:  # the left clients' requests settle (answered or dropped)
            values = metric_values(httpx.get(f"{server.url}/metrics").text)
            if values[("siam_in_flight_requests", ())] <= 1:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
    answered = sum(v for (name, labels), v in values.items() if name == "siam_predictions_total")
    # every image of a 200 answer counted; a left client's request may have been answered or dropped
    assert images_answered <= answered <= images_answered + seen["left"], (answered, images_answered, seen)
    errors = sum(v for (name, _), v in values.items() if name == "siam_errors_total")
    refused = sum(v for k, v in seen.items() if k not in ("200", "left"))
    assert refused <= errors <= refused + seen["left"], (errors, seen)
    assert values[("siam_errors_total", (("kind", "internal"),))] == 0
    growth_mib = (marks[-1] - marks[1]) / 1024  # after warm-up (first third) to the end
    assert growth_mib < 30, f"RSS grew {growth_mib:.1f} MiB during the soak: {marks}"


# --- access: keys, rate limit, no paths --------------------------------------------------------------


def test_api_keys_guard_predictions_but_not_health_or_metrics(checkpoint: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# ops team\n{hash_key('s3cret')}  # alice\n")
    with TestClient(create_app(app_settings(checkpoint, api_keys=keys))) as client:
        image = {"content": PNG, "headers": {"content-type": "image/png"}}
        r = client.post("/predict", **image)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert client.post("/predict", content=PNG, headers={"content-type": "image/png",
                                                             "Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/predict", content=PNG, headers={"content-type": "image/png",
                                                             "Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/predict", content=PNG, headers={"content-type": "image/png",
                                                             "X-API-Key": "s3cret"}).status_code == 200
        for authorization, api_key, status in [("bearer s3cret", None, 200),  # the scheme in any case
                                               ("Basic s3cret", None, 401),  # only Bearer carries a key
                                               ("Bearer ", "s3cret", 200),  # an empty Bearer: the header key
                                               ("Bearer wrong", "s3cret", 401)]:  # Bearer first
            headers = {"content-type": "image/png", "Authorization": authorization} | (
                {"X-API-Key": api_key} if api_key else {})
            assert client.post("/predict", content=PNG, headers=headers).status_code == status, authorization
        assert client.get("/v1/models").status_code == 401
        assert client.post("/v2/models/tiny/infer", json={}).status_code == 401
        assert client.post("/feedback", json={"id": "x", "label": 0}).status_code == 401
        for open_path in ("/health/live", "/health/ready", "/metrics", "/v2/health/ready", "/openapi.json"):
            assert client.get(open_path).status_code == 200, open_path
        assert 'siam_errors_total{kind="unauthorized"} 7.0' in client.get("/metrics").text


def test_a_keys_file_with_a_plain_key_in_it_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("s3cret\n")
    with pytest.raises(ValueError, match="keys:1: not a SHA-256"):
        read_key_hashes(keys)
    keys.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no key hashes"):
        read_key_hashes(keys)


def test_rate_limit_answers_429_with_retry_after(checkpoint: Path) -> None:
    cfg = app_settings(checkpoint, rate_limit_per_s=0.5, rate_limit_burst=3)
    with TestClient(create_app(cfg)) as client:
        statuses = [client.post("/predict", content=PNG, headers={"content-type": "image/png"}).status_code
                    for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        r = client.post("/predict", content=PNG, headers={"content-type": "image/png"})
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 2
        exact = r.json()["retry_after_s"]  # the header's whole seconds, exactly
        assert 0 < exact <= 2 and int(r.headers["retry-after"]) == max(1, math.ceil(exact))
        assert client.get("/health/ready").status_code == 200  # health is not rate limited


def test_token_buckets_refill_at_the_rate_and_forget_old_clients() -> None:
    buckets = TokenBuckets(rate=2.0, burst=2, capacity=3)
    assert [buckets.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.5]
    assert buckets.take("a", now=0.25) == pytest.approx(0.25)  # half a token refilled: not yet
    assert buckets.take("a", now=0.5) == 0.0  # a whole one
    assert buckets.take("a", now=0.5) == pytest.approx(0.5)
    for client in "bcd":
        buckets.take(client, now=1.0)
    assert buckets.take("a", now=1.0) == 0.0  # forgotten (capacity 3): a fresh, full bucket


def test_answers_name_the_model_never_a_path(checkpoint: Path, tmp_path: Path) -> None:
    with TestClient(create_app(app_settings(checkpoint))) as client:
        listing = client.get("/v1/models").text
        assert str(checkpoint.parent) not in listing and "tiny" in listing
    missing = tmp_path / "secret-place" / "nope"
    with TestClient(create_app(app_settings(missing, exit_on_load_error=False))) as client:
        for path in ("/health/ready", "/v1/models"):
            text = client.get(path).text
            assert str(tmp_path) not in text and "secret-place" not in text, text
            assert "nope" in text
    assert without_paths("FileNotFoundError: /a/b/c/weights.safetensors and /x/y", Path("/a/b/c")) == \
        "FileNotFoundError: c/weights.safetensors and y"  # other paths keep their file name only


def test_feedback_refuses_a_label_outside_the_classes(checkpoint: Path) -> None:
    with TestClient(create_app(app_settings(checkpoint))) as client:
        pid = client.post("/predict", content=PNG, headers={"content-type": "image/png"}).json()["id"]
        r = client.post("/feedback", json={"id": pid, "label": 999})
        assert r.status_code == 422 and "[0, 10)" in r.json()["detail"]
        assert client.post("/feedback", json={"id": pid, "label": 3}).status_code == 200  # the id was kept


def test_certified_answers_never_certify_a_label_their_probabilities_do_not_name(checkpoint: Path) -> None:
    with TestClient(create_app(app_settings(checkpoint, certify_selection_samples=8))) as client:
        for seed in range(12):
            r = client.post("/predict?samples=8&certify=true&alpha=0.4",
                            content=image_bytes(seed), headers={"content-type": "image/png"}).json()
            top = max(range(10), key=lambda c: r["probabilities"][c])
            assert r["abstained"] or r["label"] == top, r


def test_every_error_kind_is_exported_at_zero_from_the_start(checkpoint: Path) -> None:
    from service.metrics import ERROR_KINDS

    with TestClient(create_app(app_settings(checkpoint))) as client:
        values = metric_values(client.get("/metrics").text)
    for kind in ("unsupported_media_type", "overloaded", "unauthorized", "rate_limited", "client_disconnected"):
        assert kind in ERROR_KINDS
        assert values[("siam_errors_total", (("kind", kind),))] == 0


@pytest.mark.subprocess
def test_a_client_that_leaves_has_its_rows_dropped_uncomputed(checkpoint: Path) -> None:
    with Server(checkpoint, "--backend", "torch", "--chunk-rows", "64", "--max-samples", "1024") as server:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{server.url}/predict?samples=1024", json={"image": b64(PNG)},
                                timeout=60)
            deadline = time.monotonic() + 30
            while metric_values(httpx.get(f"{server.url}/metrics").text)[("siam_in_flight_requests", ())] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            body = b'{"image": "' + b64(PNG).encode() + b'"}'
            with socket.create_connection(("127.0.0.1", server.port)) as s:  # queued behind the first, then gone
                s.sendall(b"POST /predict?samples=1024 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert first.result().status_code == 200
        deadline = time.monotonic() + 10
        while True:
            values = metric_values(httpx.get(f"{server.url}/metrics").text)
            if values[("siam_errors_total", (("kind", "client_disconnected"),))] >= 1:
                break
            assert time.monotonic() < deadline, "the server never noticed the client leave"
            time.sleep(0.02)
        assert values[("siam_rows_total", (("model", "tiny"),))] == 1024  # the first request's rows only


@pytest.mark.subprocess
@pytest.mark.parametrize("workers", ["1", "2"])
def test_siam_serve_speaks_https_with_a_certificate(checkpoint: Path, tmp_path: Path, workers: str) -> None:
    """HTTPS from the one process, and from each HTTP worker of `--workers 2`."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = Server(checkpoint, "--backend", "torch", "--chunk-rows", "64", "--ssl-certfile", str(cert),
                    "--ssl-keyfile", str(key), "--workers", workers)
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        url = server.url.replace("http://", "https://")
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health/ready", verify=trust, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.proc.poll() is None, server.output()
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.25)
        r = httpx.post(f"{url}/predict", content=PNG, headers={"content-type": "image/png"}, verify=trust)
        assert r.status_code == 200 and r.json()["model"] == "tiny"
        image = tmp_path / "a.png"
        image.write_bytes(PNG)
        siam_predict.main([str(image), "--url", url, "--cacert", str(cert), "--samples", "2"])  # exits 1 if unanswered
        with pytest.raises(SystemExit, match=r"certificate this machine does not trust .+; pass --cacert"):
            siam_predict.main([str(image), "--url", url])
        with pytest.raises(httpx.TransportError):  # plain HTTP on the HTTPS port gets no answer
            httpx.get(f"{server.url}/health/live", timeout=5)
    finally:
        server.stop()
