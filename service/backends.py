"""Backends: what turns a batch of images and their sample counts into the logits of every noisy copy.

Both draw the smoothing noise on the model's device, one independent draw per row:

* :class:`TorchBackend` runs :meth:`models.smooth.Smooth.noisy_logits` (PNI weight noise per row too);
* :class:`OnnxBackend` runs the exported graph (``models.onnx``), whose ``RandomNormalLike`` draws the
  noise inside ONNX Runtime; with ``SIAM_ORT_NOISE=torch``, on the CPU, ``torch.randn`` draws it a chunk
  at a time and the graph takes it as an input (``models.onnx.with_noise_input``).

Seeded images (``?seed=`` when allowed) get noise from :class:`models.noise.SeededNoise`, so a seeded
image has the same answer on either backend and whatever shares its batch. The graph takes that noise
already added, expressed in pixel space, with ``sigma = 0`` (or, fed, as its ``noise`` input).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from models.checkpoint import Manifest, load_checkpoint
from models.noise import SeededNoise
from models.onnx import NOISE_INPUT, with_noise_input
from models.pni import has_weight_noise
from models.resnet import Classifier
from models.smooth import Smooth
from service.cuda_graphs import GraphedForward
from service.settings import Settings

log = logging.getLogger("siam.backend")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Backend(Protocol):
    name: str
    device: torch.device
    precision: str
    chunk_rows: int

    def logits(self, images: torch.Tensor, samples: Sequence[int], seeds: Sequence[int | None]) -> torch.Tensor:
        """``[sum(samples), C]`` float32 logits, image by image, each copy with its own noise."""
        ...

    def describe(self) -> dict[str, object]: ...


class Pending(Protocol):
    """A backend call queued or done: ``result()`` waits for its logits (or raises its error)."""

    def done(self) -> bool: ...

    def result(self) -> torch.Tensor: ...


class Done:
    """A call computed already, or failed."""

    def __init__(self, logits: torch.Tensor | None = None, error: Exception | None = None):
        self.logits, self.error = logits, error

    def done(self) -> bool:
        return True

    def result(self) -> torch.Tensor:
        if self.error is not None:
            raise self.error
        assert self.logits is not None
        return self.logits


def joined(parts: list[np.ndarray]) -> torch.Tensor:
    """A call's chunk logits, in order, as one tensor (no copy for a single chunk)."""
    return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))


def host_floats(images: torch.Tensor) -> torch.Tensor:
    """``images`` as float32 on the CPU, untouched when they are already (each torch call releases the GIL)."""
    return images if images.dtype == torch.float32 and images.device.type == "cpu" else images.float().cpu()


class Chunks:
    """A call's chunks, queued on a pool's threads."""

    def __init__(self, futures: list[Future[np.ndarray]]):
        self.futures = futures

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def result(self) -> torch.Tensor:
        return joined([f.result() for f in self.futures])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} requested but CUDA is not available on this machine")
    return device


def seeded_unit_noise(images: torch.Tensor, samples: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """The seeded standard-normal draw for every copy of ``images``, in order."""
    return SeededNoise.for_copies(list(seeds), [(0, m) for m in samples], images.device).normal(images.shape[1:])


def seeded_pixel_noise(manifest: Manifest, images: torch.Tensor, samples: Sequence[int],
                       seeds: Sequence[int]) -> torch.Tensor:
    """The seeded smoothing noise for every copy, converted to pixel space (``sigma`` included)."""
    spec = manifest.spec
    noise = seeded_unit_noise(images, samples, seeds) * spec.smoothing.sigma
    if spec.smoothing.space == "normalized":  # N(0, s^2) after normalization == std * that before it
        noise = noise * torch.tensor(spec.normalization.std, device=noise.device).view(1, 3, 1, 1)
    return noise


class TorchBackend:
    """Eager PyTorch (optionally ``torch.compile``), on CPU or CUDA, fp32/fp16/bf16."""

    name = "torch"

    def __init__(self, model: Classifier, manifest: Manifest, device: torch.device, precision: str,
                 chunk_rows: int, compile_model: bool = False, cuda_graphs: bool = False):
        self.manifest = manifest
        self.device = device
        self.precision = precision
        self.dtype = DTYPES[precision]
        model = model.to(device=device, dtype=self.dtype).eval()
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.smooth = Smooth(model, manifest.spec.smoothing, manifest.spec.architecture.num_classes, chunk_rows)
        if compile_model:
            self.smooth.model = torch.compile(model, dynamic=True)  # type: ignore[assignment]
        self.graphed: GraphedForward | None = None
        if cuda_graphs:  # load_backend allows it on CUDA, for models without PNI weight noise
            self.graphed = GraphedForward(self.smooth.fresh_forward)
            self.smooth.fresh_forward = self.graphed  # type: ignore[method-assign]

    @property
    def chunk_rows(self) -> int:
        return self.smooth.chunk_rows

    @chunk_rows.setter
    def chunk_rows(self, value: int) -> None:
        self.smooth.chunk_rows = value

    def logits(self, images: torch.Tensor, samples: Sequence[int], seeds: Sequence[int | None]) -> torch.Tensor:
        images = images.to(self.device, self.dtype, non_blocking=True)
        out = self.smooth.noisy_logits(images, samples, seeds if any(s is not None for s in seeds) else None)
        return out.float().cpu()

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "device": str(self.device), "precision": self.precision,
                "compiled": isinstance(self.smooth.model, torch._dynamo.eval_frame.OptimizedModule),
                "cuda_graphs": sorted(self.graphed.graphs) if self.graphed is not None else None}


class OnnxBackend:
    """ONNX Runtime: the CUDA provider on a GPU, the CPU provider otherwise (see ``describe``)."""

    name = "onnx"

    def __init__(self, path: Path, manifest: Manifest, device: torch.device, chunk_rows: int,
                 threads: int | None, spin: str, ort_threads: str = "per-call", host_noise: bool = False):
        import onnxruntime as ort

        # SIAM_ORT_NOISE: the graph draws the noise on its device, or torch draws it on the CPU and feeds it.
        if host_noise and device.type != "cpu":
            raise RuntimeError("SIAM_ORT_NOISE=torch draws the noise on the CPU; on a GPU the graph draws it on "
                               "the device (SIAM_ORT_NOISE=graph)")
        # per-chunk: one thread per call, and up to `workers` calls at once on the chunks of a batch. auto: the
        # same, except that a batch with fewer rows than threads (a lone m = 1 request) runs as one call on all
        # of them, the one case where intra-op threads measured faster.
        cpu_threads = threads or os.cpu_count() or 1
        self.ort_threads = ort_threads if device.type == "cpu" and cpu_threads > 1 else "per-call"
        self.workers = cpu_threads if self.ort_threads != "per-call" else 1
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="siam-ort") if self.workers > 1 else None
        if device.type == "cuda":
            providers: list[object] = [("CUDAExecutionProvider", {"device_id": device.index or 0}),
                                       "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.host_noise = host_noise
        graph = with_noise_input(path) if self.host_noise else str(path)

        def session(intra_op_threads: int | None) -> ort.InferenceSession:
            options = ort.SessionOptions()
            if intra_op_threads:
                options.intra_op_num_threads = intra_op_threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0" if spin == "never" else "1")
            options.add_session_config_entry("session.force_spinning_stop", "1" if spin == "in-run" else "0")
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            return ort.InferenceSession(graph, options, providers=providers)

        # `session` answers per-call batches; `_chunk_session` (one thread per call) the pool's chunks.
        self.session = session(1 if self.ort_threads == "per-chunk" else threads)
        self._chunk_session = (self.session if self.ort_threads != "auto" else session(1))
        self.provider = self.session.get_providers()[0]
        if device.type == "cuda" and self.provider != "CUDAExecutionProvider":
            raise RuntimeError(f"ONNX Runtime could not use CUDA (providers: {self.session.get_providers()})")
        self.manifest = manifest
        self.device = device
        self.precision = "fp32"
        self.chunk_rows = chunk_rows
        self.sigma = np.array([manifest.spec.smoothing.sigma], dtype=np.float32)
        self.zero = np.zeros(1, dtype=np.float32)
        self.path = path

    def _run(self, rows: np.ndarray, sigma: np.ndarray, noise: np.ndarray | None,
             session: object | None = None) -> np.ndarray:
        feed = {"images": rows, "sigma": sigma}
        if self.host_noise:  # fresh draws unless the caller brings the seeded ones
            feed[NOISE_INPUT] = torch.randn(rows.shape).numpy() if noise is None else noise
        return (session or self.session).run(["logits"], feed)[0]  # type: ignore[attr-defined]

    def logits(self, images: torch.Tensor, samples: Sequence[int], seeds: Sequence[int | None]) -> torch.Tensor:
        images = host_floats(images)
        if all(s is None for s in seeds):  # the usual batch: the copies in order, fresh noise for each
            return self._chunked(np.repeat(images.numpy(), samples, axis=0), self.sigma)
        out: list[torch.Tensor | None] = [None] * len(samples)
        unseeded = [i for i, s in enumerate(seeds) if s is None]
        seeded = [i for i, s in enumerate(seeds) if s is not None]
        if unseeded:
            counts = [samples[i] for i in unseeded]
            rows = np.repeat(images[unseeded].numpy(), counts, axis=0)
            for i, part in zip(unseeded, self._chunked(rows, self.sigma).split(counts), strict=True):
                out[i] = part
        if seeded:
            counts = [samples[i] for i in seeded]
            rows = np.repeat(images[seeded].numpy(), counts, axis=0)
            seeds_of = [seeds[i] for i in seeded]
            if self.host_noise:
                parts = self._chunked(rows, self.sigma, seeded_unit_noise(images[seeded], counts, seeds_of).numpy())
            else:
                noise = seeded_pixel_noise(self.manifest, images[seeded], counts, seeds_of).numpy()
                parts = self._chunked(rows + noise, self.zero)
            for i, part in zip(seeded, parts.split(counts), strict=True):
                out[i] = part
        return torch.cat([t for t in out if t is not None])

    @property
    def group_rows(self) -> int:
        """Rows the engine hands over per call. With a pool of one-thread calls, about
        ``CHUNKS_PER_THREAD`` chunks per thread: the threads take chunks as they free up and wait for each
        other once per call, a small chunk apart (:func:`chunk_bounds`), rather than at every chunk, where a
        thread that the HTTP side had pre-empted held the other one idle."""
        return self.chunk_rows * self.workers * CHUNKS_PER_THREAD if self._pool is not None else self.chunk_rows

    def submit(self, images: torch.Tensor, samples: Sequence[int], seeds: Sequence[int | None]) -> Pending:
        """:meth:`logits`, queued: with a pool of one-thread calls, the chunks are queued on its threads and
        this returns at once, so the engine can answer the batch before while they run and queue the next
        call behind them. Other calls (seeded, or one on all threads) are computed here."""
        if not self._shared(sum(samples)) or any(s is not None for s in seeds):
            return Done(self.logits(images, samples, seeds))
        return self._queue(np.repeat(host_floats(images).numpy(), samples, axis=0), self.sigma)

    def _shared(self, rows: int) -> bool:
        """Whether a call of ``rows`` rows goes to the pool of one-thread calls."""
        return self._pool is not None and not (self.ort_threads == "auto" and rows < self.workers)

    def _queue(self, array: np.ndarray, sigma: np.ndarray, noise: np.ndarray | None = None) -> Chunks:
        assert self._pool is not None
        return Chunks([self._pool.submit(self._run, array[start:stop], sigma,
                                         None if noise is None else noise[start:stop], self._chunk_session)
                       for start, stop in chunk_bounds(array.shape[0], self.chunk_rows, self.workers)])

    def _chunked(self, array: np.ndarray, sigma: np.ndarray, noise: np.ndarray | None = None) -> torch.Tensor:
        shared = self._shared(array.shape[0])
        bounds = chunk_bounds(array.shape[0], self.chunk_rows, self.workers if shared else 1)
        if shared and len(bounds) > 1:
            return self._queue(array, sigma, noise).result()
        session = self._chunk_session if shared else self.session
        parts = [self._run(array[start:stop], sigma, None if noise is None else noise[start:stop], session)
                 for start, stop in bounds]
        return joined(parts)

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "device": str(self.device), "precision": self.precision,
                "provider": self.provider, "providers": self.session.get_providers(), "graph": str(self.path),
                "ort_threads": self.ort_threads,
                "noise_drawn_by": "torch" if self.host_noise else "graph",
                "ort_parallel_calls": self.workers}


CHUNKS_PER_THREAD = 8


def chunk_bounds(rows: int, size: int, workers: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each call when ``workers`` threads share ``rows`` rows in calls of at most
    ``size``. Up to ``size * workers`` rows: one equal share per thread. More, on one thread: chunks of
    ``size``. More, on several: chunks of ``size`` while much is left, then each at most
    ``1 / (2 * workers)`` of what is left, down to ``size // 4`` (guided scheduling, as OpenMP's): threads
    that take the next chunk as they free up finish about a small chunk apart, not up to a whole chunk."""
    if rows <= size * workers:
        share = max(1, -(-rows // workers))
        return [(start, min(rows, start + share)) for start in range(0, rows, share)]
    smallest = max(1, size // 4) if workers > 1 else size
    bounds, start = [], 0
    while start < rows:
        stop = min(rows, start + max(smallest, min(size, -(-(rows - start) // (2 * workers)))))
        bounds.append((start, stop))
        start = stop
    return bounds


def onnx_graph(model: Classifier, manifest: Manifest, checkpoint: Path, cache: Path) -> Path:
    """The checkpoint's ONNX graph: its own ``model.onnx`` when that was exported from these very weights
    (``siam export`` records their checksum in the graph), else one exported once per checksum into ``cache``."""
    from models.onnx import export_onnx, exported_weights

    shipped = Path(checkpoint) / "model.onnx"
    if shipped.is_file() and exported_weights(shipped) == manifest.weights.sha256:
        return shipped
    path = cache / f"{manifest.name}-{manifest.weights.sha256[:16]}.onnx"
    if not path.is_file():
        log.info("exporting %s to ONNX at %s", checkpoint, path)
        tmp = path.with_suffix(".tmp.onnx")
        export_onnx(model, manifest.spec, tmp, manifest.weights.sha256)
        tmp.replace(path)
    return path


def int8_graph(manifest: Manifest, checkpoint: Path) -> Path:
    """The checkpoint's int8 graph, written by ``siam export --int8`` from these very weights."""
    from models.onnx import exported_weights
    from models.quantize import INT8_FILE

    path = Path(checkpoint) / INT8_FILE
    if not path.is_file() or exported_weights(path) != manifest.weights.sha256:
        raise RuntimeError(f"no int8 graph of these weights in {Path(checkpoint).name}: run "
                           f"`siam export {checkpoint} --int8` first")
    return path


def tune_chunk_rows(backend: Backend, size: int, candidates: Sequence[int] | None = None,
                    budget_s: float = 0.3) -> int:
    """The chunk size with the most noisy rows per second on this device (measured, not assumed). On a GPU
    the sizes go up to 2048 rows: on an H200 the forward was still faster at 1024 than at 512. A backend
    with a pool of one-thread calls gets one chunk per thread in each measured call, as it serves."""
    if candidates is None:
        candidates = (32, 64, 128, 256, 512) + ((1024, 2048) if backend.device.type == "cuda" else ())
    best, best_rate = backend.chunk_rows, 0.0
    images = torch.rand(1, 3, size, size)
    threads = getattr(backend, "workers", 1)
    for chunk in candidates:
        backend.chunk_rows, rows = chunk, chunk * threads
        backend.logits(images, [rows], [None])  # warm this shape
        done, start = 0, time.perf_counter()
        while True:
            backend.logits(images, [rows], [None])
            done += rows
            elapsed = time.perf_counter() - start
            if elapsed > budget_s:
                break
        rate = done / elapsed
        log.info("chunk_rows %d: %.0f rows/s", chunk, rate)
        if rate > best_rate:
            best, best_rate = chunk, rate
    backend.chunk_rows = best
    return best


def machine_key(backend: Backend, weights_sha256: str) -> str:
    """What the fastest chunk depends on: the model, the backend and its device, threads, the CPU."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda" else ""
    parallel = ([f"{backend.ort_threads} x{backend.workers} chunk/thread"]  # type: ignore[attr-defined]
                if getattr(backend, "workers", 1) > 1 else [])
    return "|".join([weights_sha256[:16], backend.name, str(backend.device), backend.precision, gpu, cpu,
                     str(torch.get_num_threads()), torch.__version__, *parallel])


@contextlib.contextmanager
def tuning_lock(cache: Path) -> Iterator[None]:
    """Held while one process measures or reads the chunk size: the model processes of ``--model-processes K``
    (or several services sharing a cache) start together, and one measurement on a quiet device beats K
    measured at once, each slowed by the others. No lock where the folder cannot be written."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        handle = open(cache.with_name(cache.name + ".lock"), "a")  # noqa: SIM115 (closed below)
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def remembered_chunk_rows(backend: Backend, size: int, weights_sha256: str, cache: Path) -> int:
    """The tuned chunk size for this model on this machine: measured once (``tune_chunk_rows``), then
    read from ``cache``, so every start serves with the same chunk (a busy machine at one start could
    otherwise pick another). Delete the file to measure again."""
    key = machine_key(backend, weights_sha256)
    with tuning_lock(cache):
        try:
            known = json.loads(cache.read_text()) if cache.is_file() else {}
        except (OSError, ValueError):
            known = {}
        if isinstance(known.get(key), int) and known[key] > 0:
            backend.chunk_rows = known[key]
            log.info("chunk_rows %d, as measured before on this machine (%s)", known[key], cache)
            return known[key]
        chosen = tune_chunk_rows(backend, size)
        try:
            cache.write_text(json.dumps({**known, key: chosen}, indent=1) + "\n")
        except OSError as e:  # a read-only folder: tune again next time, serve now
            log.warning("could not remember chunk_rows in %s: %s", cache, e)
    return chosen


def load_backend(settings: Settings) -> tuple[Backend, Manifest]:
    """Load the checkpoint and build the backend the settings ask for (``auto`` picks ONNX Runtime
    unless the model has PNI weight noise, which only the torch backend draws per row)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    model, manifest = load_checkpoint(settings.checkpoint, "cpu")
    has_pni = has_weight_noise(model)
    kind = settings.backend
    if kind == "auto":
        kind = "onnx" if settings.precision == "int8" else (
            "torch" if has_pni or settings.precision != "fp32" else "onnx")
    if kind == "onnx" and has_pni:
        raise RuntimeError("the onnx backend cannot draw PNI weight noise per row; use SIAM_BACKEND=torch")
    if kind == "onnx" and settings.precision in ("fp16", "bf16"):
        raise RuntimeError("the onnx backend serves fp32 and int8 graphs; use SIAM_BACKEND=torch for fp16/bf16")
    if kind == "torch" and settings.precision == "int8":
        raise RuntimeError("int8 is served by the onnx backend (SIAM_BACKEND=onnx or auto)")
    graphs_possible = kind == "torch" and device.type == "cuda" and not has_pni and not settings.compile
    if settings.cuda_graphs is True and not graphs_possible:
        raise RuntimeError("SIAM_CUDA_GRAPHS=true needs the torch backend on a CUDA device, a model without PNI "
                           "weight noise and no SIAM_COMPILE (it captures the eager forward); auto turns it off "
                           "elsewhere")
    cuda_graphs = graphs_possible and settings.cuda_graphs is not False
    chunk = 256 if settings.chunk_rows == "auto" else int(settings.chunk_rows)
    backend: Backend
    if kind == "onnx":
        path = (int8_graph(manifest, settings.checkpoint) if settings.precision == "int8" else
                onnx_graph(model, manifest, settings.checkpoint, settings.onnx_cache))
        backend = OnnxBackend(path, manifest, device, chunk, settings.threads, settings.ort_spin,
                              ort_threads=settings.ort_threads,
                              host_noise=settings.ort_noise == "torch")
        backend.precision = settings.precision
    else:
        backend = TorchBackend(model, manifest, device, settings.precision, chunk, settings.compile, cuda_graphs)
    return backend, manifest
