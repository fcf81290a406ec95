"""The HTTP API in-process (FastAPI's TestClient runs the real app, lifespan included)."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CLASSES, batch_tolerance, make_model
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import b64, image_bytes, locked_feedback_file

from models import save_checkpoint
from models.canary import Canary, save_canary
from service.app import create_app
from service.settings import Settings

PNG = image_bytes(0)


def settings(checkpoint: Path, **kw: object) -> Settings:
    base: dict[str, object] = {"checkpoint": checkpoint, "backend": "torch", "chunk_rows": 64, "threads": 1,
                               "max_samples": 256, "max_images": 4, "max_body_bytes": 262144, "allow_seed": True,
                               "onnx_cache": checkpoint.parent / "onnx"}
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(checkpoint))) as c:
        yield c


def metric_value(text: str, metric: str, **labels: str) -> float:
    """The sum of the samples of ``metric`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_health_models_and_docs(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "live"}
    assert client.get("/health/ready").status_code == 200
    model = client.get("/v1/models").json()["models"][0]
    assert model["name"] == "tiny" and model["runtime"]["backend"] == "torch"
    assert model["spec"]["smoothing"]["sigma"] == 0.25
    assert client.get("/docs").status_code == 200
    document = client.get("/openapi.json").json()
    assert {"/predict", "/feedback", "/v2/models/{name}/infer"} <= set(document["paths"])
    # the API-key schemes, on exactly the routes that check a key
    assert set(document["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    secured = {f"{method} {path}" for path, operations in document["paths"].items()
               for method, operation in operations.items() if "security" in operation}
    assert secured == {"post /predict", "post /feedback", "get /v1/models", "get /v2/models/{name}",
                       "get /v2/models/{name}/versions/{version}", "post /v2/models/{name}/infer",
                       "post /v2/models/{name}/versions/{version}/infer"}
    # every reference resolves (the KServe body's nested models included), so generated clients can use it
    schemas = document["components"]["schemas"]
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(document)))
    assert {"InferRequestIn", "TensorIn", "OutputIn"} <= refs <= set(schemas)
    assert "$defs" not in json.dumps(schemas["InferRequestIn"])


@pytest.mark.parametrize("samples", [1, 16, 256])
def test_predict_one_image(client: TestClient, samples: int) -> None:
    r = client.post(f"/predict?samples={samples}", json={"image": b64(PNG)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "label", "class_name", "probabilities", "vote_share", "samples", "model",
                         "latency_ms", "aggregation"}
    assert body["samples"] == samples and body["model"] == "tiny"
    assert math.isclose(sum(body["probabilities"]), 1.0, rel_tol=1e-5)
    assert body["label"] == int(np.argmax(body["probabilities"]))
    assert body["class_name"] == CLASSES[body["label"]]
    assert 0 < body["vote_share"] <= 1 and body["latency_ms"] > 0


def test_raw_bytes_jpeg_and_several_images(client: TestClient) -> None:
    r = client.post("/predict", content=image_bytes(1, fmt="JPEG"), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["samples"] == 8  # the checkpoint's default m
    r = client.post("/predict?samples=4", json={"images": [b64(PNG), b64(image_bytes(2))]})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2


def test_vote_aggregation_returns_vote_shares(client: TestClient) -> None:
    body = client.post("/predict?samples=10&aggregation=vote", json={"image": b64(PNG)}).json()
    assert body["aggregation"] == "vote"
    assert all(abs(p * 10 - round(p * 10)) < 1e-6 for p in body["probabilities"])
    assert body["vote_share"] == max(body["probabilities"])


def test_seed_gives_same_answer_and_is_off_by_default(client: TestClient, checkpoint: Path) -> None:
    a = client.post("/predict?samples=8&seed=5", json={"image": b64(PNG)}).json()
    b = client.post("/predict?samples=8&seed=5", json={"images": [b64(image_bytes(3)), b64(PNG)]}).json()
    assert a["probabilities"] == pytest.approx(b["predictions"][1]["probabilities"], abs=batch_tolerance(1e-6))
    with TestClient(create_app(settings(checkpoint, allow_seed=False))) as strict:
        r = strict.post("/predict?seed=5", json={"image": b64(PNG)})
        assert r.status_code == 403 and "seed" in r.json()["detail"]


def test_certify_reports_radius_or_abstains(client: TestClient) -> None:
    body = client.post("/predict?samples=64&certify=true&alpha=0.01", json={"image": b64(PNG)}).json()
    assert isinstance(body["abstained"], bool)
    if body["abstained"]:
        assert body["label"] == -1 and body["radius"] == 0 and body["class_name"] is None
    else:
        assert body["radius"] > 0 and 0.5 <= body["p_lower"] <= 1


def truncated_png() -> bytes:
    return PNG[: len(PNG) // 2]


BAD_REQUESTS = [
    ("not base64", "/predict", {"json": {"image": "***"}}, 400, "base64"),
    ("not an image", "/predict", {"json": {"image": b64(b"hello world")}}, 400, "not a PNG or JPEG"),
    ("truncated image", "/predict", {"content": truncated_png(), "headers": {"content-type": "image/png"}}, 400,
     "truncated"),
    ("wrong size", "/predict", {"content": image_bytes(0, size=40), "headers": {"content-type": "image/png"}}, 422,
     "32x32"),
    ("grayscale", "/predict", {"content": image_bytes(0, mode="L"), "headers": {"content-type": "image/png"}}, 422,
     "3 channels"),
    ("rgba", "/predict", {"json": {"image": b64(image_bytes(0, mode="RGBA"))}}, 422, "got 4"),
    ("empty body", "/predict", {"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty"),
    ("body too large", "/predict", {"content": b"x" * 300000, "headers": {"content-type": "image/png"}}, 413, "limit"),
    ("too many images", "/predict", {"json": {"images": [b64(image_bytes(0, size=8))] * 5}}, 413, "at most 4"),
    ("no images", "/predict", {"json": {"images": []}}, 400, "no images"),
    ("samples 0", "/predict?samples=0", {"json": {"image": b64(PNG)}}, 422, "between 1 and 256"),
    ("samples negative", "/predict?samples=-3", {"json": {"image": b64(PNG)}}, 422, "between 1 and 256"),
    ("samples above max", "/predict?samples=257", {"json": {"image": b64(PNG)}}, 422, "between 1 and 256"),
    ("samples not a number", "/predict?samples=ten", {"json": {"image": b64(PNG)}}, 422, "valid integer"),
    ("unknown aggregation", "/predict?aggregation=median", {"json": {"image": b64(PNG)}}, 422, "vote"),
    ("wrong content type", "/predict", {"content": PNG, "headers": {"content-type": "text/plain"}}, 415,
     "text/plain"),
    ("no content type", "/predict", {"content": PNG}, 415, "not supported"),
    ("malformed json", "/predict", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422,
     "invalid JSON"),
    ("both image and images", "/predict", {"json": {"image": b64(PNG), "images": [b64(PNG)]}}, 422, "exactly one"),
    ("unsupported format", "/predict", {"json": {"image": b64(image_bytes(0, fmt="BMP"))}}, 415, "BMP"),
    ("bad alpha", "/predict?certify=true&alpha=2", {"json": {"image": b64(PNG)}}, 422, "alpha"),
]


@pytest.mark.parametrize(("path", "kwargs", "status", "message"), [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_clear_4xx(client: TestClient, path: str, kwargs: dict, status: int, message: str) -> None:
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert client.post("/predict?samples=2", json={"image": b64(PNG)}).status_code == 200  # still serving


def v2_request(array: np.ndarray, datatype: str, **params: object) -> dict:
    return {"inputs": [{"name": "images", "shape": list(array.shape), "datatype": datatype,
                        "data": array.reshape(-1).tolist()}], "parameters": params}


def test_kserve_v2_json(client: TestClient) -> None:
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2/models/tiny").json()
    assert meta["inputs"][0]["shape"] == [-1, 3, 32, 32] and meta["parameters"]["samples"] == 8
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    r = client.post("/v2/models/tiny/infer", json=v2_request(x, "FP32", samples=4, seed=1))
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["probabilities"]["shape"] == [2, 10] and outputs["label"]["shape"] == [2]
    u8 = np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    r = client.post("/v2/models/tiny/infer", json=v2_request(u8, "UINT8"))
    assert r.status_code == 200 and r.json()["parameters"]["samples"] == 8
    errors_before = metric_value(client.get("/metrics").text, "siam_errors_total", kind="not_found")
    missing = client.get("/v2/models/other")
    assert missing.status_code == 404 and "'other' is not served here" in missing.json()["error"]
    wrong_version = client.post("/v2/models/tiny/versions/7/infer", json=v2_request(u8, "UINT8"))
    assert wrong_version.status_code == 404 and "no version '7'" in wrong_version.json()["error"]
    assert metric_value(client.get("/metrics").text, "siam_errors_total", kind="not_found") == errors_before + 2


BAD_TENSORS = [
    ("nan", v2_request(np.full((1, 3, 32, 32), np.nan, np.float32), "FP32"), 422, "NaN"),
    ("out of range", v2_request(np.full((1, 3, 32, 32), 255, np.float32), "FP32"), 422, "[0, 1]"),
    ("wrong shape", v2_request(np.zeros((1, 1, 32, 32), np.float32), "FP32"), 422, "shape"),
    ("wrong datatype", v2_request(np.zeros((1, 3, 32, 32), np.float32), "FP64"), 422, "FP64"),
    ("data count", {"inputs": [{"name": "x", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.5]}]}, 400,
     "needs 3072"),
    ("samples param", v2_request(np.zeros((1, 3, 32, 32), np.float32), "FP32", samples="many"), 422, "integer"),
    ("two inputs", {"inputs": [{}, {}]}, 400, "at most 1 item"),
    # Each of these answered 500 once (int64 overflow in the size check, parameters of the wrong type).
    ("overflowing shape", {"inputs": [{"name": "x", "shape": [2**33, 2**31, 3, 32, 32], "datatype": "FP32",
                                       "data": []}]}, 422, "shape"),
    ("overflowing binary shape", {"inputs": [{"name": "x", "shape": [2**62, 3, 32, 32], "datatype": "UINT8",
                                              "parameters": {"binary_data_size": 0}}]}, 413, "N <= 4"),
    ("parameters a list", {**v2_request(np.zeros((1, 3, 32, 32), np.float32), "FP32"), "parameters": [1]}, 400,
     "parameters"),
    ("parameters a string", {**v2_request(np.zeros((1, 3, 32, 32), np.float32), "FP32"), "parameters": "x"}, 400,
     "parameters"),
    ("input parameters a list", {"inputs": [{"name": "x", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                             "parameters": [], "data": [0.5] * 3072}]}, 400, "parameters"),
    ("outputs not a list", {**v2_request(np.zeros((1, 3, 32, 32), np.float32), "FP32"), "outputs": {"a": 1}},
     400, "outputs"),
    ("output parameters a list", {**v2_request(np.zeros((1, 3, 32, 32), np.float32), "FP32"),
                                  "outputs": [{"name": "label", "parameters": []}]}, 400, "outputs"),
    ("shape as strings", {"inputs": [{"name": "x", "shape": ["1", "3", "32", "32"], "datatype": "FP32",
                                      "data": [0.5] * 3072}]}, 400, "shape"),
]


@pytest.mark.parametrize(("body", "status", "message"), [b[1:] for b in BAD_TENSORS], ids=[b[0] for b in BAD_TENSORS])
def test_kserve_bad_tensors(client: TestClient, body: dict, status: int, message: str) -> None:
    r = client.post("/v2/models/tiny/infer", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_kserve_refuses_absurd_json_and_headers_with_4xx(client: TestClient) -> None:
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = client.post("/v2/models/tiny/infer", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "recursion" in r.json()["error"]
    body = json.dumps(v2_request(np.zeros((1, 3, 32, 32), np.float32), "FP32")).encode()
    # A superscript two (latin-1 on the wire) is isdigit() in Python, yet int() refuses it.
    for header in ("\u00b2".encode("latin-1"), b"-1", b"1e3", b" 12", str(len(body) + 1).encode()):
        r = client.post("/v2/models/tiny/infer", content=body,
                        headers={"content-type": "application/json", "Inference-Header-Content-Length": header})
        assert r.status_code == 400, (header, r.text)
    r = client.post("/v2/models/tiny/versions/2/infer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 404 and "version" in r.json()["error"]
    r = client.post("/v2/models/tiny/versions/1/infer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_feedback_counts_live_accuracy(client: TestClient) -> None:
    before = client.get("/metrics").text
    first = client.post("/predict?samples=4", json={"image": b64(PNG)}).json()
    second = client.post("/predict?samples=4", json={"image": b64(PNG)}).json()
    assert client.post("/feedback", json={"id": first["id"], "label": first["label"]}).json()["correct"] is True
    wrong = (second["label"] + 1) % 10
    assert client.post("/feedback", json={"id": second["id"], "label": wrong}).json()["correct"] is False
    assert client.post("/feedback", json={"id": first["id"], "label": 0}).status_code == 404  # used once
    assert client.post("/feedback", json={"id": "nope", "label": 0}).status_code == 404
    after = client.get("/metrics").text
    labels = {"model": "tiny", "samples": "2-4"}
    assert metric_value(after, "siam_feedback_total", **labels) - metric_value(before, "siam_feedback_total",
                                                                               **labels) == 2
    assert metric_value(after, "siam_feedback_correct_total", **labels) - metric_value(
        before, "siam_feedback_correct_total", **labels) == 1


def test_with_a_feedback_file_a_restarted_service_refuses_a_second_feedback(checkpoint: Path, tmp_path: Path) -> None:
    """SIAM_FEEDBACK_DB: the memory of which answers had feedback outlives the process, so live accuracy does
    not count an answer twice after a restart; a file locked past the busy timeout answers 503 (kind
    feedback_unavailable, Retry-After) and counts nothing, so the client's retry is taken once. A file that
    cannot be opened leaves the service not ready, saying why."""
    shared = {"feedback_db": tmp_path / "feedback.sqlite", "feedback_secret": "kept by the deployment, 32 chars"}
    with TestClient(create_app(settings(checkpoint, **shared))) as first:
        answers = [first.post("/predict?samples=4", json={"image": b64(PNG)}).json() for _ in range(2)]
        assert first.post("/feedback", json={"id": answers[0]["id"], "label": 0}).status_code == 200
    with TestClient(create_app(settings(checkpoint, **shared))) as restarted:
        again = restarted.post("/feedback", json={"id": answers[0]["id"], "label": 0})
        assert again.status_code == 404 and "already has feedback" in again.json()["detail"]
        with locked_feedback_file(restarted.app.state.siam.feedback, shared["feedback_db"], busy_timeout_s=0.1):
            locked = restarted.post("/feedback", json={"id": answers[1]["id"], "label": 0})
        assert locked.status_code == 503 and locked.headers["retry-after"] == "1", locked.text
        assert "could not be written" in locked.json()["detail"]
        retried = restarted.post("/feedback", json={"id": answers[1]["id"], "label": 0})
        assert retried.status_code == 200, retried.text
        text = restarted.get("/metrics").text
        assert metric_value(text, "siam_errors_total", kind="feedback_unavailable") == 1
        assert metric_value(text, "siam_feedback_total", model="tiny") == 1  # the retry only
    with TestClient(create_app(settings(checkpoint, feedback_db=tmp_path, exit_on_load_error=False))) as unusable:
        ready = unusable.get("/health/ready")
        assert ready.status_code == 503 and "SIAM_FEEDBACK_DB" in ready.json()["detail"], ready.text
        assert str(tmp_path) not in ready.text  # paths stay out of answers, as for the checkpoint


def test_labelled_counters_exist_at_zero_before_the_first_event(checkpoint: Path) -> None:
    """Prometheus's rate() misses a series' first event unless the series was exported at 0 before it."""
    with TestClient(create_app(settings(checkpoint))) as fresh:
        families = {s.name: s for f in text_string_to_metric_families(fresh.get("/metrics").text) for s in f.samples
                    if s.name in ("siam_feedback_total", "siam_feedback_correct_total", "siam_predictions_total")
                    and s.labels.get("samples") == "5-16"}
        assert set(families) == {"siam_feedback_total", "siam_feedback_correct_total", "siam_predictions_total"}
        assert all(s.value == 0 and s.labels["model"] == "tiny" for s in families.values())
        assert "siam_errors_total" in {s.name for f in text_string_to_metric_families(fresh.get("/metrics").text)
                                       for s in f.samples if s.labels.get("kind") == "queue_full"}


def test_metrics_cover_latency_batches_and_errors(client: TestClient) -> None:
    client.post("/predict?samples=3", json={"image": b64(PNG)})
    client.post("/predict?samples=0", json={"image": b64(PNG)})
    text = client.get("/metrics").text
    assert metric_value(text, "siam_request_duration_seconds_count", endpoint="/predict", status="200") >= 1
    assert metric_value(text, "siam_request_duration_seconds_count", endpoint="/predict", status="422") >= 1
    assert metric_value(text, "siam_errors_total", kind="bad_request") >= 1
    for name in ("siam_queue_wait_seconds_count", "siam_model_compute_seconds_count", "siam_batch_rows_count",
                 "siam_batch_formation_seconds_count", "siam_vote_share_count", "siam_rows_total"):
        assert metric_value(text, name) > 0, name
    assert metric_value(text, "siam_model_info", name="tiny", backend="torch") == 1


def test_concurrent_requests_with_mixed_samples_match_unbatched(checkpoint: Path) -> None:
    app = create_app(settings(checkpoint, max_wait_ms=200))
    cases = [(i, m) for i, m in enumerate((1, 4, 16, 4, 8, 32))]
    with TestClient(app) as c:
        alone = {i: c.post(f"/predict?samples={m}&seed=9", json={"image": b64(image_bytes(i))}).json()
                 for i, m in cases}
        batches_before = metric_value(c.get("/metrics").text, "siam_batch_rows_count")
        with ThreadPoolExecutor(len(cases)) as pool:
            together = dict(zip([i for i, _ in cases], pool.map(
                lambda im: c.post(f"/predict?samples={im[1]}&seed=9", json={"image": b64(image_bytes(im[0]))}).json(),
                cases), strict=True))
        batches = metric_value(c.get("/metrics").text, "siam_batch_rows_count") - batches_before
    assert batches < len(cases)  # some requests really shared a batch
    for i, m in cases:
        assert together[i]["samples"] == m
        assert together[i]["probabilities"] == pytest.approx(alone[i]["probabilities"], abs=batch_tolerance(1e-5))


def test_onnx_backend_answers_like_torch(checkpoint: Path) -> None:
    answers = {}
    for backend in ("torch", "onnx"):  # on the CPU: a GPU machine's ONNX Runtime may lack the CUDA provider
        with TestClient(create_app(settings(checkpoint, backend=backend, device="cpu"))) as c:
            assert c.get("/v1/models").json()["models"][0]["runtime"]["backend"] == backend
            answers[backend] = c.post("/predict?samples=16&seed=4", json={"image": b64(PNG)}).json()
    assert answers["onnx"]["probabilities"] == pytest.approx(answers["torch"]["probabilities"], abs=1e-4)


def test_canary_exports_accuracy_gauges(tmp_path: Path) -> None:
    model, spec = make_model()
    save_checkpoint(tmp_path / "c", model, spec, name="canaried")
    images = torch.rand(6, 3, 32, 32)
    labels = torch.zeros(6, dtype=torch.long)
    save_canary(tmp_path / "c", Canary(labels, {"clean": images, "pgd": images.clone()}, {"clean": "test"}))
    with TestClient(create_app(settings(tmp_path / "c", canary_interval_s=60, canary_samples="1,4"))) as c:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = c.get("/metrics").text
            if metric_value(text, "siam_canary_last_run_timestamp_seconds") > 0:
                break
            time.sleep(0.1)
        for attack in ("clean", "pgd"):
            for m in ("1", "4"):
                value = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                         if s.name == "siam_canary_accuracy" and s.labels == {"model": "canaried", "samples": m,
                                                                               "attack": attack}]
                assert len(value) == 1 and 0 <= value[0] <= 1
        # The canary's own answers are compute (rows), not client predictions.
        assert metric_value(text, "siam_rows_total") > 0
        assert metric_value(text, "siam_predictions_total") == 0
        assert metric_value(text, "siam_vote_share_count") == 0


def test_not_ready_when_checkpoint_is_broken(tmp_path: Path) -> None:
    with TestClient(create_app(settings(tmp_path / "missing"))) as c:
        r = c.get("/health/ready")
        assert r.status_code == 503 and "not a checkpoint folder" in r.json()["detail"]
        r = c.post("/predict", json={"image": b64(PNG)})
        assert r.status_code == 503 and r.headers["retry-after"]


def test_serve_exits_with_a_message_when_the_checkpoint_cannot_load(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "service.cli", str(tmp_path / "nonexistent"), "--port", "0"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 1, done.stderr[-2000:]
    assert "siam serve: could not load" in done.stderr and "not a checkpoint folder" in done.stderr
    assert "Traceback" not in done.stderr


def test_kserve_binary_outputs_carry_the_json_answers_bytes(client: TestClient) -> None:
    """With binary_data_output the tensors follow the JSON header, each its binary_data_size bytes, in the
    order of the outputs list: they must decode to what the JSON form answers for the same seed."""
    x = np.random.default_rng(2).random((2, 3, 32, 32), dtype=np.float32)
    as_json = client.post("/v2/models/tiny/infer", json=v2_request(x, "FP32", samples=4, seed=9)).json()
    json_out = {o["name"]: o for o in as_json["outputs"]}
    r = client.post("/v2/models/tiny/infer", json=v2_request(x, "FP32", samples=4, seed=9, binary_data_output=True))
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    head_length = int(r.headers["inference-header-content-length"])
    head, tail = json.loads(r.content[:head_length]), r.content[head_length:]
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    offset = 0
    for out in head["outputs"]:
        size = out["parameters"]["binary_data_size"]
        values = np.frombuffer(tail[offset:offset + size], dtype=dtypes[out["datatype"]]).reshape(out["shape"])
        offset += size
        reference = json_out[out["name"]]
        assert out["datatype"] == reference["datatype"] and out["shape"] == reference["shape"]
        assert np.allclose(values.reshape(-1), reference["data"], atol=1e-6), out["name"]
    assert offset == len(tail) and {o["name"] for o in head["outputs"]} == {"probabilities", "label", "vote_share"}
    assert head["model_name"] == "tiny" and head["parameters"]["samples"] == 4


def test_tensor_inputs_are_checked_and_scaled_exactly() -> None:
    from service.images import InputError, from_tensor

    edges = np.zeros((1, 3, 32, 32), dtype=np.float64)
    edges[0, 0, 0, 0] = 1.0  # 0 and 1 themselves are valid pixels
    out = from_tensor(edges, "FP32", 32)
    assert out.dtype == torch.float32 and float(out.max()) == 1.0 and float(out.min()) == 0.0
    for bad, message in [(np.full((1, 3, 32, 32), 1.5), "[0, 1]"), (np.full((1, 3, 32, 32), -0.5), "[0, 1]"),
                         (np.full((1, 3, 32, 32), np.inf), "NaN or infinite"),
                         (np.zeros((1, 4, 32, 32)), "[N, 3, 32, 32]"), (np.zeros((3, 32, 32)), "got [3, 32, 32]")]:
        with pytest.raises(InputError, match=re.escape(message)):
            from_tensor(bad, "FP32", 32)
    white = np.full((2, 32, 32, 3), 255, dtype=np.uint8)
    assert torch.equal(from_tensor(white, "UINT8", 32), torch.ones(2, 3, 32, 32))
    with pytest.raises(InputError, match=re.escape("UINT8 input must have shape [N, 32, 32, 3], got [1, 32, 32, 4]")):
        from_tensor(np.zeros((1, 32, 32, 4), dtype=np.uint8), "UINT8", 32)
    with pytest.raises(InputError, match=re.escape("datatype INT8 is not supported; send FP32 [N,3,32,32]")):
        from_tensor(np.zeros((1, 3, 32, 32)), "INT8", 32)


def test_kserve_json_answer_echoes_the_id_and_names_the_version(client: TestClient) -> None:
    x = np.random.default_rng(4).random((2, 3, 32, 32), dtype=np.float32)
    r = client.post("/v2/models/tiny/infer", json={**v2_request(x, "FP32", samples=4), "id": "req-7"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["id"] == "req-7" and body["model_name"] == "tiny" and body["model_version"] == "1"
    out = {o["name"]: o for o in body["outputs"]}
    assert len(out["probabilities"]["data"]) == 20 and out["probabilities"]["shape"] == [2, 10]
    assert "id" not in client.post("/v2/models/tiny/infer", json=v2_request(x, "FP32", samples=4)).json()


@pytest.mark.parametrize(("spin", "allow", "stop"), [("always", "1", "0"), ("in-run", "1", "1"), ("never", "0", "0")])
def test_ort_spin_modes_reach_onnx_runtimes_session(checkpoint: Path, spin: str, allow: str, stop: str) -> None:
    from service.backends import load_backend

    backend, _ = load_backend(settings(checkpoint, backend="onnx", device="cpu", ort_spin=spin))
    options = backend.session.get_session_options()  # type: ignore[attr-defined]
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == allow
    assert options.get_session_config_entry("session.force_spinning_stop") == stop


@pytest.mark.parametrize("mode", ["per-chunk", "auto"])
@pytest.mark.parametrize("rows", [[1], [3, 5], [40, 1, 23]])
def test_per_chunk_onnx_threads_give_every_copy_its_own_row_in_order(checkpoint: Path, rows: list[int],
                                                                     mode: str) -> None:
    """SIAM_ORT_THREADS=per-chunk (and auto): one thread per ONNX Runtime call, a batch's chunks on two threads at
    once; seeded copies come back exactly as the per-call session computes them, in order."""
    from service.backends import load_backend

    per_call, _ = load_backend(settings(checkpoint, backend="onnx", device="cpu", threads=2, chunk_rows=8,
                                        ort_threads="per-call"))
    per_chunk, _ = load_backend(settings(checkpoint, backend="onnx", device="cpu", threads=2, chunk_rows=8,
                                         ort_threads=mode))
    assert per_chunk.describe()["ort_threads"] == mode and per_chunk.describe()["ort_parallel_calls"] == 2
    assert per_call.describe()["ort_threads"] == "per-call"
    options = per_chunk._chunk_session.get_session_options()  # type: ignore[attr-defined]
    assert options.intra_op_num_threads == 1
    images = torch.rand(len(rows), 3, 32, 32)
    seeds = list(range(100, 100 + len(rows)))
    want = per_call.logits(images, rows, seeds)
    got = per_chunk.logits(images, rows, seeds)
    assert got.shape == (sum(rows), 10)
    assert torch.allclose(got, want, atol=1e-5)
    unseeded = per_chunk.logits(images, rows, [None] * len(rows))  # fresh noise, same shape, every row distinct
    assert unseeded.shape == (sum(rows), 10) and torch.unique(unseeded[:, 0]).numel() == sum(rows)


def test_auto_onnx_threads_run_a_batch_smaller_than_the_threads_as_one_call_on_all_of_them(
        checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIAM_ORT_THREADS=auto: a lone m = 1 request (1 row, 2 threads) goes to the session with two intra-op
    threads, in one call; two rows or more are shared out, one row-chunk per thread, on the one-thread session."""
    from service.backends import OnnxBackend, load_backend

    backend, _ = load_backend(settings(checkpoint, backend="onnx", device="cpu", threads=2, chunk_rows=8,
                                       ort_threads="auto"))
    assert backend.session.get_session_options().intra_op_num_threads == 2  # type: ignore[attr-defined]
    assert backend._chunk_session.get_session_options().intra_op_num_threads == 1  # type: ignore[attr-defined]
    calls: list[tuple[int, int]] = []
    run = OnnxBackend._run

    def spy(self: OnnxBackend, rows: Any, sigma: Any, noise: Any, session: Any = None) -> Any:
        calls.append((rows.shape[0], (session or self.session).get_session_options().intra_op_num_threads))
        return run(self, rows, sigma, noise, session)

    monkeypatch.setattr(OnnxBackend, "_run", spy)
    image = torch.rand(1, 3, 32, 32)
    backend.logits(image, [1], [None])
    assert calls == [(1, 2)]
    calls.clear()
    backend.logits(image, [2], [None])
    assert sorted(calls) == [(1, 1), (1, 1)]
    calls.clear()
    backend.logits(image.repeat(3, 1, 1, 1), [16, 16, 2], [None] * 3)  # 34 rows in chunks of at most 8
    assert sum(r for r, _ in calls) == 34 and {t for _, t in calls} == {1} and max(r for r, _ in calls) == 8
