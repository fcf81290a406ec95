"""Every serving knob in one place: environment variables ``SIAM_*`` (or ``siam serve`` flags).

What a model answers (sigma, its space, default m, aggregation, noise layers) is NOT here: it comes
from the checkpoint manifest. These settings only say how the service runs it and what it accepts.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Beside the code (an editable install or the Docker image), so `siam serve` works from any folder.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "resnet20-trades30"
DEFAULT_ONNX_CACHE = Path(".siam-cache/onnx")


class Settings(BaseSettings):
    """Service settings; each field is also the environment variable ``SIAM_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="SIAM_", extra="ignore")

    # what to serve, and on what
    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description="checkpoint folder (manifest.json + weights)")
    backend: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="auto: ONNX Runtime when the model has no PNI weight noise, else PyTorch")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["fp32", "fp16", "bf16", "int8"] = Field(
        "fp32", description="model precision (fp16/bf16: CUDA, torch backend; int8: ONNX Runtime on the CPU, the "
        "graph `siam export --int8` wrote)")
    threads: int | None = Field(None, ge=1, description="CPU threads for the model (default: all cores)")
    ort_spin: Literal["always", "in-run", "never"] = Field(
        "always", description="onnx backend: when ONNX Runtime's idle threads busy-wait for work. always: also "
        "between calls (ORT's default; the idle threads then take CPU from the HTTP side), in-run: only while a "
        "call runs, never: they sleep (slower hand-offs between operators)")
    ort_threads: Literal["per-call", "per-chunk", "auto"] = Field(
        "auto", description="onnx backend on the CPU: how the model's threads share a batch. per-call: every "
        "ONNX Runtime call uses all of them (intra-op threads, ORT's usual way); per-chunk: each call runs on one "
        "thread and a batch's chunks run on all of them at once (no threads left spinning between calls); auto: "
        "per-chunk, except a batch with fewer rows than threads (a lone m = 1 request), which runs per-call")
    ort_noise: Literal["graph", "torch"] = Field(
        "graph", description="onnx backend: who draws the smoothing noise. graph: the graph's own RandomNormalLike, "
        "on the model's device; torch: torch.randn on the CPU, fed to the graph as an input (a third of ONNX "
        "Runtime's CPU cost per number; over HTTP on 2 cores it measured level with graph: 0.99-1.07x)")
    compile: bool = Field(False, description="torch backend: wrap the model in torch.compile")
    cuda_graphs: bool | Literal["auto"] = Field(
        "auto", description="torch backend on a GPU: replay the noisy forward (noise included) from CUDA graphs, one "
        "per power-of-two chunk size, chunks padded up to it (on an H200: 1.1-4.2x the eager forward per call, "
        "1.55x the engine at m = 1). auto: on for the torch backend on CUDA without PNI weight noise or compile")
    onnx_cache: Path = Field(DEFAULT_ONNX_CACHE, description="where exported ONNX graphs are kept")

    # batching
    chunk_rows: int | Literal["auto"] = Field(
        "auto", description="noisy rows per model call; auto: the fastest size, measured at the first start on "
        "this machine and remembered in tuning_cache")
    tuning_cache: Path = Field(Path(".siam-cache/chunk-rows.json"), description="where chunk_rows=auto remembers "
                               "its measurement per model and machine (delete it to measure again)")
    max_batch_rows: int = Field(4096, ge=1, description="noisy rows the worker takes from the queue at once")
    max_wait_ms: float = Field(0.0, ge=0, description="how long an idle worker waits for more requests (0: none; "
                               "requests arriving while the model runs batch together anyway)")
    max_queue: int = Field(256, ge=1, description="requests waiting beyond this get 503 at once")
    request_timeout_s: float = Field(30.0, gt=0, description="a request still waiting after this gets 504")

    # what requests may ask
    max_samples: int = Field(1024, ge=1, description="largest samples (m) a request may ask for")
    max_images: int = Field(64, ge=1, description="images per request")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="larger bodies get 413")
    allow_seed: bool = Field(False, description="let clients fix the noise with ?seed= (makes the model "
                                                "deterministic to them, so attackable: off by default)")
    allow_resize: bool = Field(False, description="resize images of another size instead of answering 422")
    max_image_pixels: int = Field(1024 * 1024, ge=1, description="with allow_resize: larger images (read from "
                                  "the header, before decoding) get 413")
    certify_selection_samples: int = Field(
        64, ge=1, description="extra copies Cohen's CERTIFY uses to pick the class (n0) when ?certify=true")

    # access
    api_keys: Path | None = Field(None, description="file of SHA-256 hashes of API keys, one per line (`siam "
                                  "api-key` makes one): predictions then need `Authorization: Bearer <key>` or "
                                  "`X-API-Key`, else 401; health and metrics stay open")
    rate_limit_per_s: float = Field(0.0, ge=0, description="requests per second per API key (or per client "
                                    "address without keys), token bucket; over it: 429 with Retry-After; 0 = off")
    rate_limit_burst: int = Field(20, ge=1, description="token bucket size: requests a client may send at once")
    ssl_certfile: Path | None = Field(None, description="serve HTTPS with this certificate (PEM)")
    ssl_keyfile: Path | None = Field(None, description="the certificate's private key (PEM)")

    # monitoring
    feedback_capacity: int = Field(100_000, ge=1, description="prediction ids each process remembers having had "
                                   "their POST /feedback, so that each counts once")
    feedback_ttl_s: float = Field(3600.0, gt=0, description="how long a prediction id accepts feedback")
    feedback_db: Path | None = Field(None, description="SQLite file of the prediction ids that had their feedback, "
                                     "shared by every process and replica that opens it (one host: a shared "
                                     "volume, not a network file system) and kept over restarts, so that a "
                                     "second feedback is refused there too; unset: each process remembers its own "
                                     "(SIAM_FEEDBACK_CAPACITY ids, lost on restart)")
    feedback_secret: SecretStr = Field(
        default_factory=lambda: SecretStr(secrets.token_urlsafe(32)),
        description="signs prediction ids; environment only (SIAM_FEEDBACK_SECRET), at least 16 characters. "
                    "Replicas that share it take feedback for each other's predictions, and ids outlive a restart; "
                    "unset: a random one per start, shared by the processes of --workers N")
    canary_interval_s: float = Field(0.0, ge=0, description="seconds between canary runs; 0 = off")
    canary_samples: str = Field("1,16", description="comma-separated m values the canary measures")
    canary_attacked: bool = Field(True, description="canary also scores the PGD-attacked canary images")

    # process
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    workers: int = Field(1, ge=1, description="HTTP worker processes; above 1 they feed one model process (which "
                         "batches all their requests together) through a Unix socket, so that request parsing, "
                         "JSON and HTTP are not bound to one Python process")
    model_processes: int = Field(1, ge=1, le=256, description="with workers above 1: model processes on the one "
                                 "device, each with its own engine, fed by every K-th worker (K = this), so that "
                                 "no single process's Python caps a fast GPU; at most workers")
    warmup: bool = Field(True, description="run the model once before reporting ready")
    exit_on_load_error: bool = Field(True, description="exit (status 1) when the checkpoint cannot be loaded, as "
                                     "Triton does; off: keep running, not ready, and say why on /health/ready")
    graceful_timeout_s: float = Field(30.0, gt=0, description="on SIGTERM, how long to finish accepted requests")

    @field_validator("feedback_secret")
    @classmethod
    def long_enough(cls, secret: SecretStr) -> SecretStr:
        if len(secret.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (e.g. `python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))'`)")
        return secret

    def canary_sample_list(self) -> list[int]:
        return [int(m) for m in self.canary_samples.split(",") if m.strip()]
