"""CUDA graphs of the noisy forward: sizes, padding and the copies of each replay's output (on the CPU with
an eager stand-in for the graph), and on a GPU, when there is one, the real capture's fresh noise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.smooth import Smooth
from models.spec import SmoothingSpec
from service.backends import load_backend
from service.cuda_graphs import GraphedForward, graph_rows
from service.settings import Settings


class EagerGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` on the CPU: a replay runs the forward on the static input and
    writes the static output in place, as a real replay does."""

    def __init__(self, forward: GraphedForward, static_in: torch.Tensor, static_out: torch.Tensor) -> None:
        self.forward, self.static_in, self.static_out = forward, static_in, static_out

    def replay(self) -> None:
        self.static_out.copy_(self.forward.forward(self.static_in))


class CpuGraphed(GraphedForward):
    def __init__(self) -> None:
        super().__init__(lambda rows: rows.flatten(1).sum(1, keepdim=True) * torch.tensor([1.0, -1.0]))
        self.captured: list[int] = []

    def capture(self, size: int, like: torch.Tensor) -> tuple[EagerGraph, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        self.captured.append(size)
        static_in = torch.zeros((size, *like.shape[1:]))
        static_out = self.forward(static_in)
        return EagerGraph(self, static_in, static_out), static_in, static_out


@pytest.mark.parametrize(("rows", "size"), [(1, 1), (2, 2), (3, 4), (64, 64), (65, 128), (1000, 1024)])
def test_a_chunk_replays_the_graph_of_the_next_power_of_two(rows: int, size: int) -> None:
    assert graph_rows(rows) == size


def test_each_chunk_gets_its_own_rows_logits_and_a_later_replay_does_not_overwrite_them() -> None:
    graphed = CpuGraphed()
    first = torch.rand(5, 3, 2, 2)
    second = torch.rand(7, 3, 2, 2)
    out_first = graphed(first)
    out_second = graphed(second)  # the same size-8 graph, replayed again
    out_one = graphed(first[:1])
    assert graphed.captured == [8, 1]  # captured once per size, on first use
    assert torch.equal(out_first, graphed.forward(first))  # still the first chunk's, padding dropped
    assert torch.equal(out_second, graphed.forward(second))
    assert torch.equal(out_one, graphed.forward(first[:1]))


def test_cuda_graphs_are_refused_where_they_cannot_run_and_auto_leaves_them_off_there(tmp_path: Path,
                                                                                     tiny_checkpoint: Path) -> None:
    settings = Settings(checkpoint=tiny_checkpoint, backend="torch", device="cpu", cuda_graphs=True,
                        onnx_cache=tmp_path)
    with pytest.raises(RuntimeError, match="SIAM_CUDA_GRAPHS=true needs the torch backend on a CUDA device"):
        load_backend(settings)
    for backend in ("torch", "onnx"):
        built, _ = load_backend(Settings(checkpoint=tiny_checkpoint, backend=backend, device="cpu",  # type: ignore[arg-type]
                                         onnx_cache=tmp_path))
        assert getattr(built, "graphed", None) is None and built.describe().get("cuda_graphs") is None


@pytest.mark.parametrize(("text", "value"), [("auto", "auto"), ("true", True), ("false", False), ("1", True)])
def test_the_setting_reads_auto_or_a_boolean_from_the_environment(text: str, value: object,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIAM_CUDA_GRAPHS", text)
    assert Settings().cuda_graphs == value
    monkeypatch.setenv("SIAM_CUDA_GRAPHS", "sometimes")
    with pytest.raises(ValueError, match="cuda_graphs"):
        Settings()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_auto_replays_the_graphs_for_the_torch_backend(tmp_path: Path, tiny_checkpoint: Path) -> None:
    built, _ = load_backend(Settings(checkpoint=tiny_checkpoint, backend="torch", device="cuda", onnx_cache=tmp_path))
    built.logits(torch.rand(2, 3, 32, 32), [3, 5], [None, None])
    assert built.describe()["cuda_graphs"] == [8]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_every_replay_draws_fresh_noise_and_matches_the_eager_forward_without_noise() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).cuda().eval()
    noisy = Smooth(model, SmoothingSpec(sigma=0.25, space="pixel"), 10)  # type: ignore[arg-type]
    graphed = GraphedForward(noisy.fresh_forward)
    rows = torch.rand(1, 3, 8, 8, device="cuda").expand(5, -1, -1, -1).contiguous()  # one image, five copies
    with torch.inference_mode():
        a, b = graphed(rows), graphed(rows)
        assert not torch.equal(a, b) and a.shape == (5, 10)  # fresh noise on every replay
        assert not torch.equal(a[0], a[1])  # and for every copy of the image
        noisy.sigma = 0.0  # the graph multiplies by the sigma it was captured with: capture a clean one
        clean = GraphedForward(noisy.fresh_forward)
        torch.testing.assert_close(clean(rows), model(rows))
