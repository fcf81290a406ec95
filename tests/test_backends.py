"""Which backend a checkpoint and its settings get, what is refused with a message that names the fix, and
the ONNX backend's rows: every image's copies in order, seeded or not, whoever draws the noise and however
the rows are shared out among ONNX Runtime's calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model, saved_tiny

from models import load_checkpoint
from models.onnx import export_onnx
from models.quantize import INT8_FILE, quantize_int8
from service.backends import OnnxBackend, host_floats, load_backend, resolve_device
from service.settings import Settings


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A plain ResNet-20 and one with PNI-W weight noise (random weights)."""
    folder = tmp_path_factory.mktemp("backends")
    return {"plain": saved_tiny(folder / "plain", make_model()),
            "pni": saved_tiny(folder / "pni", make_model(pni="layer"))}


def settings(checkpoint: Path, **kw: object) -> Settings:
    base: dict[str, object] = {"checkpoint": checkpoint, "device": "cpu", "threads": 1, "chunk_rows": 16,
                               "onnx_cache": checkpoint.parent / "onnx"}
    return Settings(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(("model", "precision", "expected"), [
    ("plain", "fp32", ("onnx", "fp32")),  # ONNX Runtime unless something rules it out
    ("plain", "fp16", ("torch", "fp16")),
    ("plain", "bf16", ("torch", "bf16")),
    ("pni", "fp32", ("torch", "fp32")),  # only torch draws PNI weight noise per row
])
def test_auto_picks_the_backend_that_can_serve_the_model_at_that_precision(
        checkpoints: dict[str, Path], model: str, precision: str, expected: tuple[str, str]) -> None:
    backend, manifest = load_backend(settings(checkpoints[model], precision=precision))
    assert (backend.name, backend.precision) == expected and manifest.name == "tiny"
    described = backend.describe()
    assert (described["backend"], described["precision"], described["device"]) == (*expected, "cpu")
    assert backend.device == torch.device("cpu")
    if backend.name == "onnx":  # SIAM_THREADS=1: one call at a time, whatever the machine's cores
        assert (described["ort_threads"], described["ort_parallel_calls"]) == ("per-call", 1)
        assert Path(str(described["graph"])).is_file() and described["provider"] == "CPUExecutionProvider"


def test_siam_compile_wraps_the_torch_backends_model(checkpoints: dict[str, Path]) -> None:
    """torch.compile compiles at the first call; wrapping is what load_backend owes (and describe reports)."""
    assert load_backend(settings(checkpoints["plain"], backend="torch"))[0].describe()["compiled"] is False
    assert load_backend(settings(checkpoints["plain"], backend="torch", compile=True))[0].describe()["compiled"] is True


@pytest.mark.parametrize(("model", "overrides", "message"), [
    ("pni", {"backend": "onnx"}, "cannot draw PNI weight noise per row; use SIAM_BACKEND=torch"),
    ("plain", {"backend": "onnx", "precision": "fp16"}, "serves fp32 and int8 graphs; use SIAM_BACKEND=torch for fp16"),
    ("plain", {"backend": "onnx", "precision": "bf16"}, "serves fp32 and int8 graphs; use SIAM_BACKEND=torch for fp16"),
    ("plain", {"backend": "torch", "precision": "int8"}, r"int8 is served by the onnx backend \(SIAM_BACKEND=onnx"),
    ("plain", {"precision": "int8"}, r"no int8 graph of these weights in plain: run `siam export .*plain --int8`"),
    ("pni", {"precision": "int8"}, "cannot draw PNI weight noise per row"),
])
def test_what_cannot_be_served_is_refused_with_the_setting_that_would_serve_it(
        checkpoints: dict[str, Path], model: str, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        load_backend(settings(checkpoints[model], **overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_device_is_refused_by_name_where_there_is_none() -> None:
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="device cuda:1 requested but CUDA is not available on this machine"):
        resolve_device("cuda:1")


def test_an_int8_graph_of_other_weights_is_refused_not_served(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """The int8 file beside the weights is checked against them: a fine-tune saved over a checkpoint
    must not keep serving the quantized graph of the weights before it."""
    model, manifest = load_checkpoint(checkpoints["plain"])
    fp32 = export_onnx(model, manifest.spec, tmp_path / "model.onnx", manifest.weights.sha256)
    calibration = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    retrained = saved_tiny(tmp_path / "retrained", make_model(seed=1))
    quantize_int8(fp32, retrained / INT8_FILE, calibration, manifest.spec.smoothing.sigma, {"split": "test"})
    with pytest.raises(RuntimeError, match="no int8 graph of these weights in retrained"):
        load_backend(settings(retrained, precision="int8"))


def test_host_floats_leaves_cpu_float32_alone_and_converts_the_rest() -> None:
    images = torch.rand(2, 3, 4, 4)
    assert host_floats(images) is images
    for other in (images.double(), images.half(), (images * 255).to(torch.uint8)):
        converted = host_floats(other)
        assert converted.dtype == torch.float32 and converted.device.type == "cpu"
        torch.testing.assert_close(converted, other.float())


@pytest.mark.parametrize("host_noise", [False, True])
def test_a_mixed_batch_gives_each_image_its_copies_in_order_on_pooled_calls(checkpoints: dict[str, Path],
                                                                           host_noise: bool) -> None:
    """Seeded and unseeded images with several copies each, on a pool of one-thread calls over many chunks:
    each seeded image's rows are what it gets alone in a one-call backend, and each unseeded image's rows are
    its own image's (noise off for those: sigma 0)."""
    served, manifest = load_backend(settings(checkpoints["plain"]))
    path = served.path  # type: ignore[attr-defined]
    pooled = OnnxBackend(path, manifest, torch.device("cpu"), 4, 2, "always", "auto", host_noise)
    alone = OnnxBackend(path, manifest, torch.device("cpu"), 64, 1, "always", "per-call", host_noise)
    assert pooled.workers == 2 and alone.workers == 1
    images, samples, seeds = torch.rand(4, 3, 32, 32), [3, 40, 2, 33], [None, 11, None, 12]
    got = pooled.logits(images, samples, seeds).split(samples)
    for i in (1, 3):
        torch.testing.assert_close(got[i], alone.logits(images[i:i + 1], [samples[i]], [seeds[i]]), atol=1e-4, rtol=0)
    pooled.sigma = alone.sigma = np.zeros(1, dtype=np.float32)
    got = pooled.logits(images, samples, seeds).split(samples)
    for i in (0, 2):
        want = alone.logits(images[i:i + 1], [1], [None])
        torch.testing.assert_close(got[i], want.expand(samples[i], -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("mode", "calls", "session_threads", "chunk_threads"), [
    ("per-call", 1, 3, 3),  # one call at a time, on all threads
    ("per-chunk", 3, 1, 1),  # three one-thread calls at once
    ("auto", 3, 3, 1),  # the same, but a batch smaller than the threads runs as one call on all of them
])
def test_siam_ort_threads_lays_out_onnx_runtimes_threads(checkpoints: dict[str, Path], mode: str, calls: int,
                                                          session_threads: int, chunk_threads: int) -> None:
    backend, _ = load_backend(settings(checkpoints["plain"], threads=3, ort_threads=mode))
    assert backend.describe()["ort_threads"] == mode and backend.describe()["ort_parallel_calls"] == calls
    assert backend.session.get_session_options().intra_op_num_threads == session_threads  # type: ignore[attr-defined]
    chunk_session = backend._chunk_session  # type: ignore[attr-defined]
    assert chunk_session.get_session_options().intra_op_num_threads == chunk_threads
    assert (chunk_session is backend.session) == (mode != "auto")  # type: ignore[attr-defined]
    assert backend.describe()["provider"] == "CPUExecutionProvider" == backend.describe()["providers"][0]


def test_the_torch_backend_computes_at_the_precision_asked_and_answers_float32(checkpoints: dict[str, Path]) -> None:
    """SIAM_PRECISION=fp16/bf16: the weights and the forward in that type (so the logits move by its rounding),
    the answer back in float32 on the CPU for the aggregation; the same seeds draw the same copies."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    answers = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        backend, _ = load_backend(settings(checkpoints["plain"], backend="torch", precision=precision))
        assert {p.dtype for p in backend.model.parameters()} == {dtype}
        assert backend.chunk_rows == 16 and backend.describe()["cuda_graphs"] is None  # (graphs: CUDA only)
        answers[precision] = backend.logits(images, [3, 2], [5, 6])
        assert answers[precision].dtype == torch.float32 and answers[precision].device.type == "cpu"
    for precision in ("bf16", "fp16"):
        assert not torch.equal(answers[precision], answers["fp32"]), precision
        torch.testing.assert_close(answers[precision], answers["fp32"], atol=0.1, rtol=0.05)
