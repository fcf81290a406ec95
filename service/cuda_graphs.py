"""The noisy forward replayed from CUDA graphs (``SIAM_CUDA_GRAPHS``, torch backend on a GPU).

A ResNet-20 forward is some sixty small kernels. On a GPU a chunk of a few dozen rows takes less time to
compute than Python takes to launch them, so the chunk waits for Python. A CUDA graph records the
launches once and replays them in one call. The noise is drawn inside the graph: each replay advances
the device generator's offset, so every replay, and every row in it, still draws fresh noise.

Graphs have fixed shapes. One is captured per power-of-two row count, the first time a chunk of that size
comes, and a chunk is padded up to it. The padding rows are computed and their logits thrown away: at
most twice the rows of a small chunk, where the launches, not the rows, cost the time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]


def graph_rows(rows: int) -> int:
    """The row count of the graph a chunk of ``rows`` rows replays: the next power of two."""
    return 1 << max(0, rows - 1).bit_length()


class GraphedForward:
    """``forward(rows)`` (rows in, logits out, noise drawn inside) replayed from one CUDA graph per size."""

    def __init__(self, forward: Forward, warmup_runs: int = 3):
        self.forward = forward
        self.warmup_runs = warmup_runs
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool: tuple[int, int] | None = None  # one memory pool shared by every size's graph

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        size = graph_rows(n)
        if size not in self.graphs:
            self.graphs[size] = self.capture(size, rows)
        graph, static_in, static_out = self.graphs[size]
        static_in[:n].copy_(rows)
        graph.replay()
        return static_out[:n].clone()  # the next replay of this size overwrites static_out

    def capture(self, size: int, like: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """Record the forward on ``size`` rows shaped like ``like``; warm it up first on a side stream, as
        capture requires (cuDNN picks its algorithms, the allocator fills its pool)."""
        static_in = torch.zeros((size, *like.shape[1:]), dtype=like.dtype, device=like.device)
        side = torch.cuda.Stream(like.device)
        side.wait_stream(torch.cuda.current_stream(like.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                self.forward(static_in)
        torch.cuda.current_stream(like.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the model's thread captures while the event loop's thread may touch CUDA.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_out = self.forward(static_in)
        return graph, static_in, static_out
