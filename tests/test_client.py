"""``siam predict``: files and folders to a real ``siam serve``, errors per image, 503 retried after Retry-After."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

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
            first = await c.predict_bytes(b"img", "image/png", samples=256, confidence=0.999)
            return first, await c.predict_file(Path(__file__), samples=4)

    first, refused = asyncio.run(run())
    assert first["samples_used"] == 32 and len(calls) == 3
    assert dict(calls[1].url.params) == {"samples": "256", "confidence": "0.999"}
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
