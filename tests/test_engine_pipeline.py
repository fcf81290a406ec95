"""The model thread's pipeline: with a backend that queues calls (``submit``), the next call waits queued
behind the running one, and every batch is still answered from its own rows, or with its own error."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from service.engine import Engine
from service.metrics import Metrics
from tests.test_engine import QueuedCall, until
from tests.test_service_api import settings


def picture(label: int) -> torch.Tensor:
    """An image whose first pixel names ``label`` to :meth:`QueuingBackend.submit`."""
    return torch.full((1, 3, 8, 8), (label + 0.5) / 10)


class QueuingBackend:
    """Queues each call on a thread of its own, as ONNX Runtime's pool does; call k computes once the test
    releases it. Each copy's logits put 10 on the class its image's first pixel names."""

    def __init__(self, chunk_rows: int, fail: set[int] | None = None) -> None:
        self.chunk_rows = chunk_rows
        self.fail = fail or set()
        self.queued: list[list[int]] = []  # each call's copies per image, in the order queued
        self.finished: list[int] = []
        self.finished_when_queued: list[list[int]] = []
        self.handles: list[QueuedCall] = []
        self.gates: defaultdict[int, threading.Event] = defaultdict(threading.Event)
        self.pool = ThreadPoolExecutor(1)

    def release(self, call: int) -> None:
        self.gates[call].set()

    def submit(self, images: torch.Tensor, samples: Sequence[int], seeds: Sequence[int | None]) -> QueuedCall:
        call = len(self.queued)
        self.queued.append(list(samples))
        self.finished_when_queued.append(list(self.finished))
        gate = self.gates[call]

        def run() -> torch.Tensor:
            assert gate.wait(10), f"the test never released call {call}"
            self.finished.append(call)
            if call in self.fail:
                raise RuntimeError(f"call {call} failed")
            classes = (images[:, 0, 0, 0] * 10).long().clamp(0, 9)
            return torch.nn.functional.one_hot(classes.repeat_interleave(torch.tensor(samples)), 10).float() * 10

        self.handles.append(QueuedCall(self.pool.submit(run)))
        return self.handles[-1]

    def logits(self, images: torch.Tensor, samples: Sequence[int], seeds: Sequence[int | None]) -> torch.Tensor:
        return self.submit(images, samples, seeds).result()


def queued_engine(backend: QueuingBackend) -> Engine:
    engine = Engine(backend, "stub", 0.25, Metrics(), max_batch_rows=4096,  # type: ignore[arg-type]
                    max_wait_ms=0, max_queue=16)
    engine.start()
    return engine


async def three_requests(backend: QueuingBackend, third_copies: int) -> tuple[list[object], list[list[int]]]:
    """Two requests of one batch (one call each: chunks of 4 rows), then a third that arrives while the
    first call runs; the calls are released one by one. Returns each request's labels or error, and which
    calls had finished when each call was queued."""
    engine = queued_engine(backend)
    first = [asyncio.create_task(engine.predict(picture(label), 4, "vote")) for label in (3, 5)]
    await until(lambda: len(backend.queued) == 2)  # both calls of the batch queued, neither computed
    assert backend.finished == []
    third = asyncio.create_task(engine.predict(picture(7), third_copies, "vote"))
    await until(lambda: engine.queue_length == 1)
    backend.release(0)
    # The worker has queued every call of the first batch and asks whether the last one has run (not yet).
    await until(lambda: backend.handles[1].asked.is_set())
    if third_copies >= backend.chunk_rows:  # it takes the third request and queues its call behind
        await until(lambda: len(backend.queued) == 3)
    backend.release(1)
    await until(lambda: all(task.done() for task in first))
    backend.release(2)
    outcomes = await asyncio.gather(*first, third, return_exceptions=True)
    await engine.stop()
    labels = [o if isinstance(o, Exception) else [a.prediction.label for a in o] for o in outcomes]
    return labels, backend.finished_when_queued


def test_a_batch_that_fills_a_chunk_is_queued_behind_the_running_call_and_each_is_answered_from_its_own_rows(
) -> None:
    """The third request (4 copies: a chunk) is taken, and its call queued, once the first batch's last call
    is queued and before it has run; each request is answered from its own rows."""
    outcomes, finished_when_queued = asyncio.run(three_requests(QueuingBackend(chunk_rows=4), 4))
    assert outcomes == [[3], [5], [7]]
    assert finished_when_queued == [[], [], [0]]


def test_fewer_rows_than_a_chunk_wait_for_the_running_call_to_end() -> None:
    """Two copies, under a chunk: taken only once the first batch's calls have all finished (a smaller
    call queued early costs more per row than the model's idle time it saves)."""
    outcomes, finished_when_queued = asyncio.run(three_requests(QueuingBackend(chunk_rows=4), 2))
    assert outcomes == [[3], [5], [7]]
    assert finished_when_queued == [[], [], [0, 1]]


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failed_call_fails_its_own_batch_only_with_the_next_batch_queued_behind_it(failing: int) -> None:
    outcomes, finished_when_queued = asyncio.run(three_requests(QueuingBackend(chunk_rows=4, fail={failing}), 4))
    assert [str(o) for o in outcomes[:2]] == [f"call {failing} failed"] * 2
    assert outcomes[2] == [7] and finished_when_queued[2] == [0]


def test_a_lone_request_is_answered_and_the_worker_goes_idle() -> None:
    async def scenario() -> None:
        backend = QueuingBackend(chunk_rows=4)
        backend.release(0)
        engine = queued_engine(backend)
        assert [a.prediction.label for a in await engine.predict(picture(2), 3, "softmax")] == [2]
        await until(lambda: not engine._busy)
        assert engine._running == [] and engine._busy_rows == 0
        backend.release(1)
        assert [a.prediction.label for a in await engine.predict(picture(6), 1, "vote")] == [6]
        await engine.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("rows", [[3, 5], [40, 1, 23]])
def test_onnx_submit_queues_a_batchs_chunks_and_gives_every_row_its_own_logits(checkpoint: Path,
                                                                               rows: list[int]) -> None:
    """Noise off (sigma 0), so that rows compare: the queued chunks give what one call on all threads gives."""
    from service.backends import Chunks, Done, load_backend

    per_call, _ = load_backend(settings(checkpoint, backend="onnx", device="cpu", threads=2, chunk_rows=8,
                                        ort_threads="per-call"))
    pooled, _ = load_backend(settings(checkpoint, backend="onnx", device="cpu", threads=2, chunk_rows=8,
                                      ort_threads="auto"))
    per_call.sigma = pooled.sigma = np.zeros(1, dtype=np.float32)  # type: ignore[attr-defined]
    images = torch.rand(len(rows), 3, 32, 32)
    pending = pooled.submit(images, rows, [None] * len(rows))  # type: ignore[attr-defined]
    assert isinstance(pending, Chunks) and len(pending.futures) > 1
    assert torch.allclose(pending.result(), per_call.logits(images, rows, [None] * len(rows)), atol=1e-5)
    assert pending.done()
    lone = pooled.submit(images[:1], [1], [None])  # type: ignore[attr-defined]
    assert isinstance(lone, Done)  # one row: computed at once, on all threads
    seeded = pooled.submit(images, rows, list(range(len(rows))))  # type: ignore[attr-defined]
    assert isinstance(seeded, Done)
    assert torch.allclose(seeded.result(), per_call.logits(images, rows, list(range(len(rows)))), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_engine_answers_64_concurrent_requests_each_from_its_own_image(checkpoint: Path) -> None:
    """Closed-loop callers, so batches of different sizes form while others run (CUDA graphs on, which pad a
    batch up to its graph's size): each request's logits (noise off) are its own image's."""
    from service.backends import load_backend

    built, _ = load_backend(settings(checkpoint, backend="torch", device="cuda", cuda_graphs=True))
    built.smooth.sigma = 0.0  # type: ignore[attr-defined]
    images = [torch.rand(1, 3, 32, 32) for _ in range(64)]
    expected = [built.logits(x, [4], [None]) for x in images]

    async def scenario() -> None:
        engine = Engine(built, "tiny", 0.0, Metrics(), max_batch_rows=4096, max_wait_ms=0, max_queue=256)
        engine.start()

        async def caller(i: int) -> None:  # closed loop: each batch forms while another is computed
            for _ in range(5):
                got = await engine.copy_logits(images[i], 4, None, 30.0)
                torch.testing.assert_close(got[0], expected[i], atol=1e-3, rtol=1e-3)

        await asyncio.gather(*(caller(i) for i in range(len(images))))
        await engine.stop()

    asyncio.run(scenario())
