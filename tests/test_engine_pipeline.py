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
        self.gates: defaultdict[int, threading.Event] = defaultdict(threading.Event)
        self.pool = ThreadPoolExecutor(1)

    def release(self, call: int) -> None:
        self.gates[call].set()

    def submit(self, images: torch.Tensor, samples: Sequence[int], seeds: Sequence[int | None]) -> QueuedCall:
        call = len(self.queued)
        self.queued.append(list(samples))
        gate = self.gates[call]

        def run() -> torch.Tensor:
            assert gate.wait(10), f"the test never released call {call}"
            self.finished.append(call)
            if call in self.fail:
                raise RuntimeError(f"call {call} failed")
            classes = (images[:, 0, 0, 0] * 10).long().clamp(0, 9)
            return torch.nn.functional.one_hot(classes.repeat_interleave(torch.tensor(samples)), 10).float() * 10

        return QueuedCall(self.pool.submit(run))

    def logits(self, images: torch.Tensor, samples: Sequence[int], seeds: Sequence[int | None]) -> torch.Tensor:
        return self.submit(images, samples, seeds).result()


def queued_engine(backend: QueuingBackend) -> Engine:
    engine = Engine(backend, "stub", 0.25, Metrics(), max_batch_rows=4096,  # type: ignore[arg-type]
                    max_wait_ms=0, max_queue=16)
    engine.start()
    return engine


async def three_requests(backend: QueuingBackend) -> tuple[list[object], list[int]]:
    """Two requests of one batch (one call each: chunks of 4 rows), then a third that arrives while the
    first call runs; the calls are released one by one. Returns each request's labels or error."""
    engine = queued_engine(backend)
    first = [asyncio.create_task(engine.predict(picture(label), 4, "vote")) for label in (3, 5)]
    await until(lambda: len(backend.queued) == 2)  # both calls of the batch queued, neither computed
    assert backend.finished == []
    third = asyncio.create_task(engine.predict(picture(7), 2, "vote"))
    await until(lambda: engine.queue_length == 1)
    backend.release(0)
    # The next batch is taken, and its call queued, while the last call of the first batch has not run.
    await until(lambda: len(backend.queued) == 3)
    assert backend.finished == [0] and not any(task.done() for task in first)
    backend.release(1)
    await until(lambda: all(task.done() for task in first))
    assert not third.done()
    backend.release(2)
    outcomes = await asyncio.gather(*first, third, return_exceptions=True)
    await engine.stop()
    return [o if isinstance(o, Exception) else [a.prediction.label for a in o] for o in outcomes], backend.finished


def test_the_next_batch_is_queued_behind_the_running_call_and_each_is_answered_from_its_own_rows() -> None:
    outcomes, finished = asyncio.run(three_requests(QueuingBackend(chunk_rows=4)))
    assert outcomes == [[3], [5], [7]] and finished == [0, 1, 2]


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failed_call_fails_its_own_batch_only_with_the_next_batch_queued_behind_it(failing: int) -> None:
    outcomes, _ = asyncio.run(three_requests(QueuingBackend(chunk_rows=4, fail={failing})))
    assert [str(o) for o in outcomes[:2]] == [f"call {failing} failed"] * 2
    assert outcomes[2] == [7]


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


def test_requests_that_fill_a_chunk_while_a_call_runs_are_taken_and_queued_behind_it() -> None:
    """Halfway through the running call (by the cost of a row), the rows gathered meanwhile give the model a
    chunk: they are taken as the next batch and its call is queued before the running one ends."""
    async def scenario() -> None:
        backend = QueuingBackend(chunk_rows=4)
        engine = queued_engine(backend)
        engine.row_cost_s = 1.0  # the running call's halfway point: 2 s after it was queued
        first = asyncio.create_task(engine.predict(picture(1), 4, "vote"))
        await until(lambda: len(backend.queued) == 1)
        gathered = [asyncio.create_task(engine.predict(picture(label), m, "vote")) for label, m in ((2, 2), (8, 3))]
        await until(lambda: len(backend.queued) == 2)  # taken while the first call is still held
        assert backend.queued == [[4], [2, 3]] and backend.finished == [] and engine.queue_length == 0
        backend.release(0)
        backend.release(1)
        labels = [[a.prediction.label for a in await task] for task in (first, *gathered)]
        assert labels == [[1], [2], [8]]
        await engine.stop()

    asyncio.run(scenario())
