"""The service as users run it: a real ``siam serve`` (uvicorn) process, for overload, deadlines,
graceful shutdown and the official Triton/KServe HTTP client."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from service_helpers import Server, b64, image_bytes, started_together

from service.settings import Settings

BODY = {"image": b64(image_bytes(0))}


def post(url: str, samples: int, timeout: float = 60) -> tuple[int, dict, float, dict]:
    start = time.perf_counter()
    r = httpx.post(f"{url}/predict?samples={samples}", json=BODY, timeout=timeout)
    return r.status_code, r.json(), time.perf_counter() - start, dict(r.headers)


def batch_seconds(checkpoint: Path, rows: int) -> float:
    """How long one batch of ``rows`` noisy rows takes on one thread here (median of three)."""
    from models import Smooth, load_checkpoint

    model, manifest = load_checkpoint(checkpoint)
    smooth = Smooth(model, manifest.spec.smoothing, 10, chunk_rows=256)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            smooth.noisy_logits(torch.rand(1, 3, 32, 32), [rows])
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return sorted(times)[1]


def test_queue_full_is_503_at_once_and_deadline_is_504(checkpoint: Path) -> None:
    rows = 512
    one = batch_seconds(checkpoint, rows)
    # One running and two queued requests of one batch each: the third cannot finish within 1.4 batches.
    timeout = max(1.4 * one, 0.2)
    # On the CPU, where batch_seconds timed it (on a GPU no batch would be slow enough to miss a deadline).
    flags = ["--device", "cpu", "--backend", "torch", "--chunk-rows", "256", "--max-queue", "2",
             "--max-batch-rows", str(rows), "--request-timeout-s", f"{timeout:.3f}", "--max-wait-ms", "0",
             "--no-warmup"]
    with Server(checkpoint, *flags) as server:
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda _: post(server.url, rows), range(10)))
        statuses = [r[0] for r in results]
        assert set(statuses) <= {200, 503, 504}, statuses
        full = [r for r in results if r[0] == 503]
        assert full, f"no request was refused: {statuses}"
        assert all(r[3].get("retry-after") for r in full)
        assert all(r[2] < max(0.5 * one, 0.25) + 0.25 for r in full), "503 must come at once, not after waiting"
        assert "busy" in full[0][1]["detail"]
        late = [r for r in results if r[0] == 504]
        assert late, f"no request missed its {timeout:.2f} s deadline (one batch: {one:.2f} s): {statuses}"
        assert "deadline" in late[0][1]["detail"]
        assert post(server.url, 4)[0] == 200  # and it still serves
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'siam_errors_total{kind="queue_full"}' in metrics and 'siam_errors_total{kind="deadline"}' in metrics


def admitted(url: str, at_least: int, timeout: float = 30) -> None:
    """Poll /metrics until ``at_least`` requests are inside the engine, waiting or taken into a batch. In
    flight is not enough before a SIGTERM: a request still reading its body then is refused 503, as one
    that arrived after the signal would be."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        value = sum(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith(("siam_queue_length ", "siam_queue_wait_seconds_count ")))
        if value >= at_least:
            return
        assert time.monotonic() < deadline, f"only {value:g} requests admitted after {timeout} s"
        time.sleep(0.02)


def test_draining_server_refuses_new_predictions_with_503(checkpoint: Path) -> None:
    """Between SIGTERM and the listening socket closing, a new request must get 503 with Retry-After. That
    window is too short to hit from outside on purpose, so the draining state itself is checked in-process."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(checkpoint=checkpoint, backend="torch", chunk_rows=64, threads=1))
    with TestClient(app) as client:
        assert client.get("/health/ready").status_code == 200
        app.state.siam.draining = True
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and "shutting down" in ready.json()["detail"]
        r = client.post("/predict", json=BODY)
        assert r.status_code == 503 and r.headers.get("retry-after")


def test_sigterm_finishes_accepted_requests_then_exits(checkpoint: Path) -> None:
    server = Server(checkpoint, "--backend", "torch", "--chunk-rows", "256", "--max-wait-ms", "0")
    with server:
        with ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(post, server.url, 512) for _ in range(3)]
            admitted(server.url, at_least=3)  # all three accepted (queued or running)
            server.proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in pending]
        assert [a[0] for a in answers] == [200, 200, 200], answers
        assert all(a[1]["samples"] == 512 for a in answers)
        assert server.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained


def test_kserve_v2_with_the_official_triton_client(checkpoint: Path) -> None:
    tritonclient = pytest.importorskip("tritonclient.http")
    with Server(checkpoint, "--backend", "torch", "--chunk-rows", "64", "--allow-seed") as server:
        client = tritonclient.InferenceServerClient(server.url.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
        meta = client.get_model_metadata("tiny")
        assert meta["inputs"][0]["shape"] == [-1, 3, 32, 32]
        x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
        for binary in (True, False):
            inp = tritonclient.InferInput("images", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            outputs = [tritonclient.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")]
            result = client.infer("tiny", [inp], outputs=outputs, parameters={"samples": 8, "seed": 3})
            probs, labels = result.as_numpy("probabilities"), result.as_numpy("label")
            assert probs.shape == (3, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
            assert (labels == probs.argmax(1)).all()
        # no outputs named: the client asks for everything in binary
        u8 = (x.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
        inp = tritonclient.InferInput("images", list(u8.shape), "UINT8")
        inp.set_data_from_numpy(u8)
        result = client.infer("tiny", [inp], parameters={"samples": 4})
        assert result.as_numpy("vote_share").shape == (3,)
        with pytest.raises(tritonclient.InferenceServerException, match="samples"):
            client.infer("tiny", [inp], parameters={"samples": 0})


def test_a_bad_setting_is_named_as_the_user_gave_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`siam serve` refuses bad settings before loading anything, naming the flag or variable and the value."""
    from service import cli

    monkeypatch.setenv("SIAM_MAX_BATCH_ROWS", "abc")
    with pytest.raises(SystemExit) as refused:
        cli.main(["--port", "99999"])
    message = str(refused.value.code)
    assert message.startswith("siam serve: invalid settings:"), message
    assert "--port: Input should be less than or equal to 65535 (given: '99999')" in message
    assert "SIAM_MAX_BATCH_ROWS: Input should be a valid integer" in message and "(given: 'abc')" in message
    assert "--max-batch-rows" not in message and "SIAM_PORT" not in message


def test_the_feedback_secret_is_read_from_the_environment_only_and_never_echoed(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from service import cli

    monkeypatch.setenv("SIAM_FEEDBACK_SECRET", "hunter2")
    with pytest.raises(SystemExit) as refused:
        cli.main([])
    message = str(refused.value.code)
    assert "SIAM_FEEDBACK_SECRET: Value error, must be at least 16 characters" in message, message
    assert "hunter2" not in message and "not shown: a secret" in message
    with pytest.raises(SystemExit) as unknown:
        cli.main(["--feedback-secret", "a-long-enough-secret-on-the-command-line"])
    assert unknown.value.code == 2 and "unrecognized arguments: --feedback-secret" in capsys.readouterr().err
    monkeypatch.setenv("SIAM_FEEDBACK_SECRET", "x" * 16)
    assert Settings().feedback_secret.get_secret_value() == "x" * 16 and "x" * 16 not in repr(Settings())
    monkeypatch.delenv("SIAM_FEEDBACK_SECRET")
    assert Settings().feedback_secret != Settings().feedback_secret  # unset: a random one for each start


def test_replicas_that_share_the_feedback_secret_take_feedback_for_each_others_answers(checkpoint: Path) -> None:
    """Two services on the same checkpoint, as replicas behind a proxy: with one SIAM_FEEDBACK_SECRET an answer
    of the first takes its feedback at the second (once there); a replica with another secret refuses it."""
    shared = {"SIAM_FEEDBACK_SECRET": "shared by the replicas, 32 chars"}
    with started_together(Server(checkpoint, "--backend", "torch", env=shared),
                          Server(checkpoint, "--backend", "torch", env=shared),
                          Server(checkpoint, "--backend", "torch")) as (first, second, stranger):
        answers = [httpx.post(f"{first.url}/predict?samples=4", json=BODY, timeout=30).json() for _ in range(2)]
        fed = httpx.post(f"{second.url}/feedback", json={"id": answers[0]["id"], "label": answers[0]["label"]},
                         timeout=10)
        assert fed.status_code == 200 and fed.json()["correct"] is True, fed.text
        again = httpx.post(f"{second.url}/feedback", json={"id": answers[0]["id"], "label": 1}, timeout=10)
        assert again.status_code == 404  # once, at the replica that took it
        refused = httpx.post(f"{stranger.url}/feedback", json={"id": answers[1]["id"], "label": 1}, timeout=10)
        assert refused.status_code == 404 and "unknown" in refused.json()["detail"], refused.text
