"""Monitoring for real: a ``siam serve`` process scraped by a real Prometheus server (Debian's
``prometheus`` package), read back through Prometheus's own query API; and ``promtool`` on the
Prometheus config, alert rules and rule unit tests shipped in docker/prometheus/."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_model, require_tool, synthetic_images
from service_helpers import ROOT, Server, free_port

from models import save_checkpoint
from service.metrics import LATENCY_BUCKETS, samples_bucket

PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "siam-serve.json"
PROMETHEUS = shutil.which("prometheus")
SAMPLES = (1, 4, 16)  # three samples buckets: "1", "2-4", "5-16"
PREDICTIONS = 24
ROUND = 6  # predictions between two scrapes


def http(method: str, url: str, body: bytes | None = None, content_type: str = "application/json",
         timeout: float = 30) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class Prometheus:
    """A real Prometheus server scraping one target every second, with the shipped alert rules."""

    def __init__(self, folder: Path, target: str):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROMETHEUS_DIR / "alerts.yml", folder / "alerts.yml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "siam", "static_configs": [{"targets": [target]}]}],
        }
        (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=(folder / "prometheus.log").open("w"))
        self.log = folder / "prometheus.log"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError("prometheus did not become ready")

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        status, body = http("GET", f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}")
        assert status == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def value(self, expr: str, at: float | None = None) -> float:
        result = self.query(expr, at)
        assert len(result) == 1, f"{expr}: expected one series, got {result}"
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, expected: float, timeout: float = 20) -> float:
        """Poll until the scraped data shows ``expected``; returns the time of that evaluation."""
        deadline = time.monotonic() + timeout
        seen: object = None
        while time.monotonic() < deadline:
            now = time.time()
            result = self.query(expr, now)
            seen = [r["value"][1] for r in result]
            if len(result) == 1 and float(result[0]["value"][1]) == expected:
                return now
            time.sleep(0.3)
        raise AssertionError(f"{expr} never reached {expected} (last seen {seen})")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def png(image: Any) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Prometheus]]:
    require_tool("prometheus", "apt-get install prometheus")
    folder = tmp_path_factory.mktemp("monitoring")
    model, spec = make_model()
    save_checkpoint(folder / "tiny", model, spec, name="tiny")
    server = Server(folder / "tiny", "--chunk-rows", "64", env={"SIAM_ONNX_CACHE": str(folder / "onnx")})
    with server:
        prometheus = Prometheus(folder / "prometheus", f"127.0.0.1:{server.port}")
        try:
            prometheus.wait_ready()
            yield server, prometheus
        finally:
            prometheus.stop()


@pytest.fixture(scope="module")
def traffic(stack: tuple[Server, Prometheus]) -> dict[str, Any]:
    """Predictions at three m with feedback on each, in rounds that Prometheus scrapes one by one (a rate
    needs a series seen before its increments), then two client errors."""
    server, prometheus = stack
    images, _ = synthetic_images(PREDICTIONS, seed=3)
    latencies, matched = [], 0
    for first in range(0, PREDICTIONS, ROUND):
        answers = []
        for i in range(first, first + ROUND):
            start = time.perf_counter()
            status, body = http("POST", f"{server.url}/predict?samples={SAMPLES[i % len(SAMPLES)]}",
                                png(images[i]), "image/png")
            latencies.append(time.perf_counter() - start)
            assert status == 200, body
            answers.append(body)
        # The true label is the predicted one for two predictions of each round and another one for the
        # rest, so the accuracy is neither 0 nor 1, and the same in every round.
        for i, answer in enumerate(answers):
            label = answer["label"] if i in (0, 4) else (answer["label"] + 1 + i) % 10
            matched += label == answer["label"]
            body = json.dumps({"id": answer["id"], "label": label}).encode()
            assert http("POST", f"{server.url}/feedback", body)[0] == 200
        prometheus.wait_for("sum(siam_feedback_total)", first + ROUND)
    assert http("POST", f"{server.url}/feedback", json.dumps({"id": "no-such-id", "label": 1}).encode())[0] == 404
    assert http("POST", f"{server.url}/predict", b"not an image", "image/png")[0] in {400, 415, 422}
    return {"accuracy": matched / PREDICTIONS, "feedback": PREDICTIONS, "latencies": latencies,
            "per_bucket": Counter(samples_bucket(SAMPLES[i % len(SAMPLES)]) for i in range(PREDICTIONS))}


def test_prometheus_scrapes_latency_quantiles(stack: tuple[Server, Prometheus], traffic: dict[str, Any]) -> None:
    _, prometheus = stack
    at = prometheus.wait_for('sum(siam_request_duration_seconds_count{endpoint="/predict",status="200"})',
                             PREDICTIONS)
    assert prometheus.value('up{job="siam"}', at) == 1
    p50, p99 = (prometheus.value(f"histogram_quantile({q}, sum by (le) "
                                 f'(rate(siam_request_duration_seconds_bucket{{endpoint="/predict"}}[1m])))', at)
                for q in (0.5, 0.99))
    # The server's own time is under what the client waited, so the quantile lies at most in the
    # histogram bucket that holds the slowest client-side latency.
    bound = next(b for b in LATENCY_BUCKETS if b >= max(traffic["latencies"]))
    assert math.isfinite(p99) and 0 < p50 <= p99 <= bound, (p50, p99, bound)
    for bucket, count in traffic["per_bucket"].items():
        assert prometheus.value(f'sum(siam_prediction_duration_seconds_count{{samples="{bucket}"}})', at) == count
    assert prometheus.value("sum(siam_predictions_total)", at) == PREDICTIONS
    assert prometheus.value("sum(siam_model_compute_seconds_count)", at) >= 1


def test_prometheus_reads_live_accuracy_from_feedback(stack: tuple[Server, Prometheus],
                                                      traffic: dict[str, Any]) -> None:
    _, prometheus = stack
    at = prometheus.wait_for("sum(siam_feedback_total)", traffic["feedback"])
    expected = traffic["accuracy"]
    assert 0 < expected < 1
    exact = prometheus.value("sum(siam_feedback_correct_total) / sum(siam_feedback_total)", at)
    assert exact == pytest.approx(expected, abs=1e-12)
    # The rate form used by the dashboard and the alerts extrapolates each series a little: close, not exact.
    live = prometheus.value("sum(rate(siam_feedback_correct_total[5m])) / sum(rate(siam_feedback_total[5m]))", at)
    assert live == pytest.approx(expected, abs=0.1)
    prometheus.wait_for("sum(siam_errors_total)", 2)  # the unknown feedback id and the broken image


def test_shipped_rules_evaluate_on_real_series(stack: tuple[Server, Prometheus], traffic: dict[str, Any]) -> None:
    _, prometheus = stack
    prometheus.wait_for("sum(siam_feedback_total)", traffic["feedback"])
    # A rule is "unknown" until its group's first evaluation after the data arrived: poll, with a bound,
    # until every rule has been evaluated; an "err" fails at once, naming the rule and its error.
    deadline = time.monotonic() + 30
    while True:
        status, body = http("GET", f"{prometheus.url}/api/v1/rules")
        assert status == 200
        rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
        assert not broken, broken
        if len(rules) >= 8 and all(r["health"] == "ok" for r in rules) and prometheus.query("siam:live_accuracy:1h"):
            break
        assert time.monotonic() < deadline, [(r["name"], r["health"]) for r in rules]
        time.sleep(0.5)
    assert prometheus.value("siam:live_accuracy:1h") == pytest.approx(traffic["accuracy"], abs=0.1)
    firing = {r["name"] for r in rules if r.get("state") == "firing"}
    assert not firing & {"SiamDown", "SiamAbsent"}, firing


def test_dashboard_queries_run_and_show_the_traffic(stack: tuple[Server, Prometheus], traffic: dict[str, Any]) -> None:
    _, prometheus = stack
    at = prometheus.wait_for("sum(siam_feedback_total)", traffic["feedback"])
    panels = json.loads(DASHBOARD.read_text())["panels"]
    empty = []
    for panel in panels:
        exprs = [t["expr"].replace("$__rate_interval", "1m") for t in panel["targets"]]
        if not any(prometheus.query(e, at) for e in exprs):
            empty.append(panel["title"])
    # Only the canary (off here) has no data; the abstention series exists at 0 from start-up.
    assert empty == ["Canary accuracy"], empty
    assert prometheus.query("max(siam_admission_margin_seconds)", at)  # a second target in a panel: unseen by any()
    # The restarts of --workers N: valid PromQL, and no series from one process (it has nothing to restart).
    restarts = next(t["expr"] for p in panels for t in p["targets"] if "siam_process_restarts_total" in t["expr"])
    assert prometheus.query(restarts, at) == []


@pytest.mark.parametrize("args", [["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                                  ["test", "rules", "alerts.test.yml"]], ids=" ".join)
def test_promtool_accepts_shipped_files(args: list[str]) -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    result = subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
