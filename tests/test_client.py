"""``siam predict``: files and folders to a real ``siam serve``, errors per image, 503 retried after Retry-After."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_helpers import Server, image_bytes

from service import client


def test_predict_folder_and_file_against_a_real_server(checkpoint: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.png").write_bytes(image_bytes(1))
    (images / "sub" / "b.jpg").write_bytes(image_bytes(2, fmt="JPEG"))
    (images / "notes.txt").write_text("not an image")  # skipped: not a PNG/JPEG name
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    with Server(checkpoint, "--backend", "torch", "--chunk-rows", "64") as server, \
            pytest.raises(SystemExit) as failed:
        client.main([str(images), str(broken), "--url", server.url, "--samples", "4", "--json"])
    assert failed.value.code == 1  # one image got no answer
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.jpg", "broken.png"]
    for r in rows[:2]:
        assert r["answer"]["samples"] == 4 and len(r["answer"]["probabilities"]) == 10 and r["error"] is None
    assert rows[2]["answer"] is None and rows[2]["error"].startswith("4")  # the service's 4xx, with its detail
    assert "1 of 3 images got no answer" in out.err


def test_503_is_retried_after_retry_after_then_answered() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(503, headers={"retry-after": "0"}, json={"detail": "busy"})
        return httpx.Response(200, json={"label": 3, "class_name": "cat", "probabilities": [0.1] * 10,
                                         "vote_share": 1.0})

    c = client.Client("http://siam.test", retries=5)
    c.http = httpx.Client(transport=httpx.MockTransport(handler))
    assert c.predict_bytes(b"img", "image/png", samples=16)["class_name"] == "cat"
    assert len(calls) == 3 and calls[0].url.params["samples"] == "16"
    calls.clear()
    c.retries = 1  # retries spent: the 503 is reported, not hidden
    with pytest.raises(httpx.HTTPStatusError, match="503: busy"):
        c.predict_bytes(b"img", "image/png")
    assert len(calls) == 2


def test_a_connection_broken_before_the_answer_is_sent_again_a_read_timeout_is_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed mid-request drops its connections ("Server disconnected without sending a response"):
    5 of 1000 images were lost that way before. A prediction changes nothing, so it is sent again; a request
    that timed out waiting may still be computing, so it is not."""
    monkeypatch.setattr(client, "BROKEN_WAIT_S", 0.0)
    calls: list[httpx.Request] = []
    broken: list[Exception] = [httpx.RemoteProtocolError("Server disconnected without sending a response."),
                               httpx.ConnectError("Connection refused"), httpx.ReadError("reset by peer")]

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) <= len(broken):
            raise broken[len(calls) - 1]
        return httpx.Response(200, json={"label": 3, "class_name": "cat"})

    c = client.Client("http://siam.test", retries=5)
    c.http = httpx.Client(transport=httpx.MockTransport(handler))
    assert c.predict_bytes(b"img", "image/png")["class_name"] == "cat" and len(calls) == 4
    calls.clear()
    c.retries = 2  # retries spent: the broken connection is reported for that image
    answer = c.predict_file(Path(__file__))
    assert answer.body is None and answer.error == "reset by peer" and len(calls) == 3  # the last break

    def slow(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ReadTimeout("timed out")

    calls.clear()
    c.http = httpx.Client(transport=httpx.MockTransport(slow))
    assert c.predict_file(Path(__file__)).error == "timed out" and len(calls) == 1

    async def run() -> dict[str, Any]:
        calls.clear()
        async with client.AsyncClient("http://siam.test", retries=5) as a:
            a.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
            return await a.predict_bytes(b"img", "image/png")

    assert asyncio.run(run())["class_name"] == "cat" and len(calls) == 4


def test_async_client_retries_alike_and_sends_confidence() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 2:
            return httpx.Response(503, headers={"retry-after": "0"}, json={"detail": "busy"})
        if len(calls) == 2:
            return httpx.Response(200, json={"label": 3, "samples_used": 32, "decided": True})
        return httpx.Response(422, json={"detail": "not an image"})

    async def run() -> tuple[dict, client.Answer]:
        async with client.AsyncClient("http://siam.test", retries=5) as c:
            c.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
            first = await c.predict_bytes(b"img", "image/png", samples=256, confidence=0.999, certify=True)
            return first, await c.predict_file(Path(__file__), samples=4)

    first, refused = asyncio.run(run())
    assert first["samples_used"] == 32 and len(calls) == 3
    assert calls[1].content == b"img" and calls[1].headers["content-type"] == "image/png"
    assert dict(calls[1].url.params) == {"samples": "256", "confidence": "0.999", "certify": "true"}
    assert refused.body is None and refused.error.startswith("422: not an image")  # reported, not retried


def test_csv_rows_carry_every_column_and_the_error() -> None:
    ok = client.csv_row(client.Answer(Path("a.png"), {"label": 3, "class_name": "cat", "probabilities": [0.2, 0.8],
                                                      "vote_share": 0.9, "samples": 256, "samples_used": 48}))
    assert ok["probability"] == 0.8 and ok["samples_used"] == 48 and ok["error"] is None
    assert set(ok) == set(client.CSV_COLUMNS)
    failed = client.csv_row(client.Answer(Path("b.png"), None, "503: busy"))
    assert failed["label"] is None and failed["error"] == "503: busy"


def test_missing_path_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="no such file or folder"):
        client.main(["/nonexistent/images"])


def test_retry_after_header_forms() -> None:
    assert client.retry_after_s("2") == 2.0 and client.retry_after_s("0") == 0.0
    assert client.retry_after_s("3600") == 30.0  # capped
    assert client.retry_after_s("Wed, 21 Oct 2026 07:28:00 GMT") == 1.0 and client.retry_after_s(None) == 1.0


def test_retries_back_off_from_the_wait_doubling_with_a_random_spread() -> None:
    first = [client.backoff_s(1.0, 0) for _ in range(200)]
    assert min(first) >= 1.0 and max(first) <= 2.0 and max(first) - min(first) > 0.5  # spread, not in step
    assert all(4.0 <= client.backoff_s(1.0, 2) <= 8.0 for _ in range(50))
    assert client.backoff_s(0.0, 3) == 0.0 and client.backoff_s(20.0, 4) == 30.0  # "now" stays now; capped


def test_the_wait_asked_for_is_the_bodys_exact_one_else_retry_after() -> None:
    def refused(body: Any, header: str | None = "1") -> float:
        headers = {"retry-after": header} if header else {}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return client.wait_of(httpx.Response(429, headers=headers, content=content))

    assert refused({"detail": "rate limit", "retry_after_s": 0.2}) == 0.2  # not the header's whole second
    assert refused({"detail": "busy"}, "3") == 3.0 and refused({"detail": "busy"}, None) == 1.0
    assert refused(b"<html>proxy</html>", "2") == 2.0 and refused(["a"], "2") == 2.0  # not a JSON object
    assert refused({"retry_after_s": True}, "2") == 2.0 and refused({"retry_after_s": "0.1"}, "2") == 2.0
    assert refused({"retry_after_s": -1}) == 0.0 and refused({"retry_after_s": 1e9}) == 30.0  # clamped


def test_a_429_is_retried_while_its_waits_fit_the_patience_a_503_a_counted_number_of_times() -> None:
    limited = httpx.Response(429, json={"detail": "rate limit", "retry_after_s": 0.1})
    retrying = client.Retrying(retries=1, patience_s=1.0)
    waits = []
    while (wait := retrying.after(limited)) is not None:
        waits.append(wait)
    assert all(0.1 <= w <= 0.2 for w in waits)  # the exact wait, spread, never doubled
    assert 5 <= len(waits) <= 10 and sum(waits) <= 1.0  # many more refusals than `retries` allows
    busy = httpx.Response(503, headers={"retry-after": "1"}, json={"detail": "busy"})
    assert 1.0 <= retrying.after(busy) <= 2.0 and retrying.after(busy) is None  # one retry, as asked
    assert client.Retrying(retries=0, patience_s=1.0).after_broken() is None
    assert retrying.after(httpx.Response(200, json={"label": 1})) is None


def test_both_clients_give_up_on_a_rate_limit_once_its_waits_would_pass_the_timeout() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(429, headers={"retry-after": "1"}, json={"detail": "rate limit", "retry_after_s": 0.1})

    sync = client.Client("http://siam.test", retries=0, timeout=0.5)
    sync.http = httpx.Client(transport=httpx.MockTransport(handler))
    with pytest.raises(httpx.HTTPStatusError, match="429: rate limit"):
        sync.predict_bytes(b"img", "image/png")
    assert 3 <= len(calls) <= 6  # waits of 0.1-0.2 s each, while they add up to 0.5 s at most

    async def run() -> None:
        async with client.AsyncClient("http://siam.test", retries=0, timeout=0.5) as c:
            c.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
            await c.predict_bytes(b"img", "image/png")

    calls.clear()
    with pytest.raises(httpx.HTTPStatusError, match="429: rate limit"):
        asyncio.run(run())
    assert 3 <= len(calls) <= 6


def test_a_rate_limited_client_loses_no_image_with_no_retries_left(checkpoint: Path, tmp_path: Path) -> None:
    paths = []
    for i in range(24):
        paths.append(tmp_path / f"{i:02d}.png")
        paths[-1].write_bytes(image_bytes(i))
    with Server(checkpoint, "--backend", "torch", "--rate-limit-per-s", "20", "--rate-limit-burst", "2") as server:
        c = client.Client(server.url, retries=0, timeout=30.0)
        start = time.perf_counter()
        answers = list(c.predict_files(paths, samples=1, concurrency=8))
        elapsed = time.perf_counter() - start
        metrics = httpx.get(f"{server.url}/metrics").text
        c.close()
    assert [a.error for a in answers] == [None] * 24
    refusals = [line for line in metrics.splitlines() if line.startswith('siam_errors_total{kind="rate_limited"}')]
    assert refusals and float(refusals[0].split()[-1]) > 0, metrics  # the limit was met, and waited out
    assert elapsed >= (24 - 2) / 20 * 0.9  # and held: no faster than 20 requests/s after the burst


def test_429_is_retried_like_503_and_the_api_key_goes_as_a_bearer_token() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(429, headers={"retry-after": "0"}, json={"detail": "rate limit"})
        return httpx.Response(200, json={"label": 3})

    c = client.Client("http://siam.test", retries=1, api_key="k1")
    c.http = httpx.Client(transport=httpx.MockTransport(handler), headers=c.http.headers)
    assert c.predict_bytes(b"img", "image/png")["label"] == 3
    assert len(calls) == 2 and all(r.headers["authorization"] == "Bearer k1" for r in calls)
    assert dict(calls[0].url.params) == {}  # nothing asked for: the service's defaults
    c.predict_bytes(b"img", "image/png", samples=64, certify=True, confidence=0.99)
    assert dict(calls[-1].url.params) == {"samples": "64", "certify": "true", "confidence": "0.99"}

    async def run() -> dict:
        async with client.AsyncClient("http://siam.test", retries=0, api_key="k2") as c:
            c.http = httpx.AsyncClient(transport=httpx.MockTransport(handler), headers=c.http.headers)
            return await c.predict_bytes(b"img", "image/png")

    assert asyncio.run(run())["label"] == 3 and calls[-1].headers["authorization"] == "Bearer k2"
    assert "authorization" not in client.Client("http://siam.test").http.headers  # no key, no header


def fake_service(monkeypatch: pytest.MonkeyPatch, handler: Any) -> None:
    """Every httpx.Client that service.client makes talks to ``handler`` instead of the network."""
    real = httpx.Client
    monkeypatch.setattr(client.httpx, "Client", lambda **kw: real(transport=httpx.MockTransport(handler), **kw))


def many_images(folder: Path, n: int) -> list[str]:
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:03d}.png").write_bytes(b"png")
    return [str(folder)]


def test_a_refused_api_key_stops_the_run_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    posts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health/live":
            return httpx.Response(200, json={"status": "live"})
        posts.append(request)
        if request.headers.get("authorization") == "Bearer right":
            return httpx.Response(200, json={"label": 1, "class_name": "car", "probabilities": [0.1] * 10,
                                             "vote_share": 1.0})
        time.sleep(0.01)
        return httpx.Response(401, json={"detail": "missing or unknown API key"})

    fake_service(monkeypatch, handler)
    paths = many_images(tmp_path / "images", 200)
    monkeypatch.delenv("SIAM_API_KEY", raising=False)
    with pytest.raises(SystemExit, match=r"refused the API key \(401: missing or unknown API key\); pass --api-key"):
        client.main([*paths, "--concurrency", "2"])
    # Each refusal takes 10 ms, so the bound leaves the main thread 80 ms or more to see the first one.
    assert len(posts) <= 20, f"{len(posts)} of 200 images sent: the run went on after the first refusal"
    assert capsys.readouterr().out == ""
    posts.clear()
    monkeypatch.setenv("SIAM_API_KEY", "right")  # the environment's key, not on the command line
    client.main([*paths, "--concurrency", "2"])
    assert len(posts) == 200 and len(capsys.readouterr().out.splitlines()) == 200


def test_no_service_at_the_url_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit, match=rf"no service answers at http://127.0.0.1:{port} \(.+\); start one with"):
        client.main([*many_images(tmp_path / "images", 3), "--url", f"http://127.0.0.1:{port}"])


def test_a_cacert_that_cannot_be_read_is_one_clear_error(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    with pytest.raises(SystemExit, match=r"^siam predict: --cacert .+missing\.pem: "):
        client.main([str(image), "--url", "https://127.0.0.1:1", "--cacert", str(tmp_path / "missing.pem")])
