"""Prometheus metrics (prometheus-client), one registry per app so tests can run several apps.

Latency is split where it is spent: queue wait, batch formation, model compute, and the whole
request. Accuracy comes three ways: feedback counters (live accuracy = correct / total), canary gauges,
and label-free signals (vote share of the winner, abstentions) per prediction.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Sub-millisecond (a cached m=1 answer) to tens of seconds (m=1024 on a CPU under load).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROW_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
USED_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 512, 1024)
SHARE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# Every value the ``kind`` label of siam_errors_total takes (service/app.py's handlers).
ERROR_KINDS = ("bad_request", "payload_too_large", "unsupported_media_type", "not_found", "feedback_unknown_id",
               "feedback_unavailable",
               "unauthorized", "rate_limited", "queue_full", "overloaded", "not_ready", "shutting_down", "deadline",
               "client_disconnected", "internal")
MODEL_LABELS = ("name", "checksum", "backend", "device", "precision", "provider")
SAMPLE_BUCKETS = ((1, "1"), (4, "2-4"), (16, "5-16"), (64, "17-64"), (256, "65-256"))


def samples_bucket(m: int) -> str:
    """A small fixed set of label values for m, so the label's cardinality stays bounded."""
    for top, name in SAMPLE_BUCKETS:
        if m <= top:
            return name
    return "257+"


class Metrics:
    """All the service's metrics on their own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.request_duration = Histogram(
            "siam_request_duration_seconds", "HTTP request duration", ["endpoint", "status"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.prediction_duration = Histogram(
            "siam_prediction_duration_seconds", "Predict request duration by samples bucket", ["samples"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("siam_queue_wait_seconds", "Time a request waited before its batch ran",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_formation = Histogram("siam_batch_formation_seconds", "Time spent gathering a batch",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.model_compute = Histogram("siam_model_compute_seconds", "Model time per batch (noise, forward, "
                                       "aggregation)", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("siam_batch_images", "Images per batch", buckets=IMAGE_BUCKETS, registry=r)
        self.batch_rows = Histogram("siam_batch_rows", "Noisy rows per batch", buckets=ROW_BUCKETS, registry=r)
        # The gauges' multiprocess modes say how `siam serve --workers N` sums them over its processes.
        self.in_flight = Gauge("siam_in_flight_requests", "Requests being handled", registry=r,
                               multiprocess_mode="livesum")
        self.queue_length = Gauge("siam_queue_length", "Requests waiting for the worker", registry=r,
                                  multiprocess_mode="livesum")
        self.admission_margin = Gauge(
            "siam_admission_margin_seconds", "Seconds added to every admission estimate, learned from how far "
            "answered requests' estimates ran over", registry=r, multiprocess_mode="max")
        self.rows = Counter("siam_rows", "Noisy rows run through the model", ["model"], registry=r)
        self.predictions = Counter("siam_predictions", "Images answered", ["model", "samples"], registry=r)
        self.errors = Counter("siam_errors", "Failed requests by kind", ["kind"], registry=r)
        self.vote_share = Histogram("siam_vote_share", "Vote share of the winning class per prediction",
                                    ["model"], buckets=SHARE_BUCKETS, registry=r)
        self.samples_used = Histogram("siam_samples_used", "Noisy copies a sequentially sampled prediction used, by "
                                      "whether its vote was decided before the budget ran out",
                                      ["model", "decided"], buckets=USED_BUCKETS, registry=r)
        self.certifications = Counter("siam_certifications", "Predictions with ?certify=true", ["model"],
                                      registry=r)
        self.abstentions = Counter("siam_abstentions", "Certified predictions that abstained", ["model"], registry=r)
        self.feedback = Counter("siam_feedback", "Predictions with a true label fed back", ["model", "samples"],
                                registry=r)
        self.feedback_correct = Counter("siam_feedback_correct", "Fed-back predictions that were right",
                                        ["model", "samples"], registry=r)
        self.canary_accuracy = Gauge("siam_canary_accuracy", "Accuracy on the canary set at the last run",
                                     ["model", "samples", "attack"], registry=r, multiprocess_mode="mostrecent")
        self.canary_last_run = Gauge("siam_canary_last_run_timestamp_seconds", "When the canary last finished",
                                     registry=r, multiprocess_mode="mostrecent")
        self.process_restarts = Counter("siam_process_restarts", "Processes of siam serve --workers N started "
                                        "again after one died, by kind (model, http)", ["process"], registry=r)
        # An info metric as a gauge at 1 (what prometheus-client's Info writes), since Info cannot be shared
        # between processes.
        self.model = Gauge("siam_model_info", "The model being served", MODEL_LABELS, registry=r,
                           multiprocess_mode="max")

    def count_start(self, process: str, restarted: bool) -> None:
        """A process of ``siam serve --workers N`` started (``process``: "model" or "http"). Each process
        writes its own file and the files of dead processes still count, so the sum is the restarts since
        the service started; a first start shows 0, so that ``increase()`` sees the first restart."""
        self.process_restarts.labels(process).inc(1 if restarted else 0)

    def describe_model(self, info: dict[str, str]) -> None:
        self.model.labels(*(info.get(name, "") for name in MODEL_LABELS)).set(1)

    def exposition(self) -> tuple[bytes, str]:
        """The text Prometheus scrapes: this registry's, or, under ``siam serve --workers N`` (which sets
        PROMETHEUS_MULTIPROC_DIR), every process's metrics summed as the gauges' modes say."""
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def prepare(self, model: str) -> None:
        """Create every labelled series at zero, so ``rate()`` and ratios see the first events.

        A counter child that first appears at 1 has no earlier sample, so Prometheus's ``rate`` and
        ``increase`` miss that first event and live accuracy stays empty until the second.
        """
        buckets = [name for _, name in SAMPLE_BUCKETS] + ["257+"]
        for bucket in buckets:
            for counter in (self.predictions, self.feedback, self.feedback_correct):
                counter.labels(model, bucket)
            self.prediction_duration.labels(bucket)
        for counter in (self.rows, self.certifications, self.abstentions):
            counter.labels(model)
        self.vote_share.labels(model)
        for decided in ("true", "false"):
            self.samples_used.labels(model, decided)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
