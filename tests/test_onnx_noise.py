"""The ONNX graph with the smoothing noise fed in (``models.onnx.with_noise_input``; ``SIAM_ORT_NOISE=torch``):
the same smoothing as the graph's own draw, seeded and fresh."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import make_model

from models import load_checkpoint, save_checkpoint
from models.checkpoint import Manifest
from models.onnx import NOISE_INPUT, export_onnx, with_noise_input
from models.resnet import Classifier
from service.backends import OnnxBackend


def exported(tmp_path: Path, space: str) -> tuple[Classifier, Manifest, Path]:
    model, spec = make_model(space=space, sigma=0.25 if space == "pixel" else 0.5)
    save_checkpoint(tmp_path / space, model, spec, name=f"tiny-{space}")
    model, manifest = load_checkpoint(tmp_path / space, "cpu")
    return model, manifest, export_onnx(model, manifest.spec, tmp_path / f"{space}.onnx")


def both_sides(path: Path, manifest: Manifest, chunk_rows: int) -> tuple[OnnxBackend, OnnxBackend]:
    """The same graph served twice on the CPU: the noise drawn by torch, and by the graph itself."""
    host, graph = (OnnxBackend(path, manifest, torch.device("cpu"), chunk_rows, 1, "always", host_noise=h)
                   for h in (True, False))
    return host, graph


@pytest.mark.parametrize("space", ["pixel", "normalized"])
def test_graph_adds_the_noise_it_is_given_where_it_drew_its_own(tmp_path: Path, space: str) -> None:
    model, manifest, path = exported(tmp_path, space)
    session = ort.InferenceSession(with_noise_input(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images", "sigma", NOISE_INPUT]
    images, z = torch.rand(5, 3, 32, 32), torch.randn(5, 3, 32, 32)
    sigma = manifest.spec.smoothing.sigma
    got = session.run(["logits"], {"images": images.numpy(), "sigma": np.array([sigma], np.float32),
                                   NOISE_INPUT: z.numpy()})[0]
    with torch.no_grad():
        want = model(images + sigma * z) if space == "pixel" else model(images, normalized_noise=sigma * z)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def test_a_graph_without_exactly_one_draw_is_refused(tmp_path: Path) -> None:
    model, manifest, _ = exported(tmp_path, "pixel")
    bare = export_onnx(model, manifest.spec, tmp_path / "bare.onnx", noise=False)
    with pytest.raises(ValueError, match="found 0"):
        with_noise_input(bare)


@pytest.mark.parametrize("space", ["pixel", "normalized"])
def test_seeded_copies_are_the_same_whichever_side_draws_the_noise(tmp_path: Path, space: str) -> None:
    _, manifest, path = exported(tmp_path, space)
    host, graph = both_sides(path, manifest, 8)
    assert host.describe()["noise_drawn_by"] == "torch" and graph.describe()["noise_drawn_by"] == "graph"
    images, samples, seeds = torch.rand(3, 3, 32, 32), [5, 1, 12], [7, None, 8]
    got, want = host.logits(images, samples, seeds), graph.logits(images, samples, seeds)
    seeded = torch.tensor([True] * 5 + [False] + [True] * 12)
    torch.testing.assert_close(got[seeded], want[seeded], atol=1e-4, rtol=0)
    assert not torch.allclose(got[~seeded], want[~seeded])  # the unseeded copy: fresh noise on each side


def test_fresh_noise_spreads_the_logits_as_the_graphs_own_draw_does(tmp_path: Path) -> None:
    """Same image, 1,024 unseeded copies: the copies' logits have the same mean and spread whether torch or
    the graph draws the noise (a wrong scale, a reused draw or uniform noise would change the spread)."""
    _, manifest, path = exported(tmp_path, "pixel")
    host, graph = both_sides(path, manifest, 256)
    image = torch.rand(1, 3, 32, 32)
    a, b = host.logits(image, [1024], [None]), graph.logits(image, [1024], [None])
    # every copy drew its own noise: no two copies share their logits (one class's float32 logit alone
    # can repeat by chance among 1,024 copies, as it once did in CI)
    assert torch.unique(a, dim=0).shape[0] == 1024
    spread = a.std(0) / b.std(0)
    assert spread.min() > 0.85 and spread.max() < 1.15, spread
    assert ((a.mean(0) - b.mean(0)).abs() < 0.2 * b.std(0)).all()


def test_siam_ort_noise_picks_who_draws(tiny_checkpoint: Path) -> None:
    """The graph draws by default (what was measured faster over HTTP); SIAM_ORT_NOISE=torch feeds it."""
    from service.backends import load_backend
    from service.settings import Settings

    drawn_by = {}
    for choice in ("graph", "torch"):
        backend, _ = load_backend(Settings(checkpoint=tiny_checkpoint, backend="onnx", device="cpu", threads=1,
                                           ort_noise=choice, onnx_cache=tiny_checkpoint.parent / "onnx"))
        drawn_by[choice] = backend.describe()["noise_drawn_by"]
    assert drawn_by == {"graph": "graph", "torch": "torch"}
    assert Settings(checkpoint=tiny_checkpoint).ort_noise == "graph"


def test_torch_drawn_noise_is_refused_off_the_cpu(tmp_path: Path) -> None:
    """On a GPU the graph draws on the device; feeding CPU noise there would copy it every chunk."""
    _, manifest, path = exported(tmp_path, "pixel")
    with pytest.raises(RuntimeError, match="SIAM_ORT_NOISE=graph"):
        OnnxBackend(path, manifest, torch.device("cuda"), 8, 1, "always", host_noise=True)


def test_export_leaves_the_callers_model_as_it_was_and_makes_the_folder(tmp_path: Path) -> None:
    """A caller goes on using the model it exported (`siam bench` times the same model under PyTorch): export
    works on a copy, so a model in train mode stays in it, module by module."""
    model, spec = make_model()
    model.train()
    path = export_onnx(model, spec, tmp_path / "a" / "b" / "model.onnx")
    assert path.is_file() and all(m.training for m in model.modules())


def test_the_exports_parity_check_asks_for_cuda_only_where_a_gpu_is_usable() -> None:
    from models.onnx import default_providers

    expected = (["CUDAExecutionProvider", "CPUExecutionProvider"]
                if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
                else ["CPUExecutionProvider"])
    assert default_providers() == expected
    assert set(default_providers()) <= set(ort.get_available_providers())


def test_the_graph_declares_what_a_deployment_reads_from_it(tmp_path: Path) -> None:
    """Triton, KServe and other runtimes size their inputs from the graph: the opset it promises, a batch
    axis shared by images and logits, the image size and the class count."""
    import onnx

    from models.onnx import OPSET, exported_weights

    _, manifest, path = exported(tmp_path, "pixel")
    assert exported_weights(path) is None  # exported without naming its weights: it says nothing
    proto = onnx.load(str(path))
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", OPSET)]

    def dims(value: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    values = [*proto.graph.input, *proto.graph.output]
    declared = {v.name: dims(v) for v in values}
    batch, classes = declared["images"][0], manifest.spec.architecture.num_classes
    assert isinstance(batch, str) and batch
    assert declared == {"images": [batch, 3, 32, 32], "sigma": [1], "logits": [batch, classes]}
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in values)
