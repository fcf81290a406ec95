"""The batching engine without HTTP: what shares a batch, and work that is dropped rather than computed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest
import torch

from service.engine import DeadlineExceededError, Engine
from service.metrics import Metrics


class GatedBackend:
    """Records every batch; each call waits until the test opens the gate."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gate = threading.Event()
        self.started = threading.Event()

    def logits(self, images: torch.Tensor, samples: Sequence[int], seeds: Sequence[int | None]) -> torch.Tensor:
        self.calls.append(list(samples))
        self.started.set()
        assert self.gate.wait(10), "the test never opened the gate"
        return torch.zeros(sum(samples), 10)


def engine_with(backend: GatedBackend, max_queue: int = 16) -> Engine:
    engine = Engine(backend, "stub", 0.25, Metrics(), max_batch_rows=4096, max_wait_ms=0,  # type: ignore[arg-type]
                    max_queue=max_queue)
    engine.start()
    return engine


async def wait_started(backend: GatedBackend) -> None:
    assert await asyncio.to_thread(backend.started.wait, 10)


def image() -> torch.Tensor:
    return torch.rand(1, 3, 8, 8)


def test_requests_of_one_loop_tick_share_one_batch() -> None:
    async def scenario() -> list[list[int]]:
        backend = GatedBackend()
        backend.gate.set()
        engine = engine_with(backend)
        answers = await asyncio.gather(*(engine.predict(image(), m, "softmax") for m in (1, 2, 3, 4)))
        assert [a[0].prediction.samples for a in answers] == [1, 2, 3, 4]
        await engine.stop()
        return backend.calls

    assert asyncio.run(scenario()) == [[1, 2, 3, 4]]


def test_a_request_whose_client_left_is_never_computed() -> None:
    async def scenario() -> list[list[int]]:
        backend = GatedBackend()
        engine = engine_with(backend)
        first = asyncio.create_task(engine.predict(image(), 2, "softmax"))
        await wait_started(backend)  # the worker is busy with the first request
        gone = asyncio.create_task(engine.predict(image(), 7, "softmax"))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        backend.gate.set()
        await first
        await engine.stop()
        return backend.calls

    assert asyncio.run(scenario()) == [[2]]


def test_a_request_past_its_deadline_fails_at_the_deadline_and_is_dropped() -> None:
    async def scenario() -> tuple[list[list[int]], float]:
        backend = GatedBackend()
        engine = engine_with(backend)
        first = asyncio.create_task(engine.predict(image(), 2, "softmax"))
        await wait_started(backend)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(DeadlineExceededError):
            await engine.predict(image(), 5, "softmax", timeout=0.2)
        waited = loop.time() - start  # the gate is still shut: the 504 did not wait for the worker
        backend.gate.set()
        await first
        later = await engine.predict(image(), 3, "softmax")  # the engine carries on
        assert later[0].prediction.samples == 3
        await engine.stop()
        return backend.calls, waited

    calls, waited = asyncio.run(scenario())
    assert 0.2 <= waited < 1.0
    assert calls == [[2], [3]]


def test_late_and_abandoned_requests_free_their_queue_place_at_once() -> None:
    async def scenario() -> list[list[int]]:
        backend = GatedBackend()
        engine = engine_with(backend, max_queue=1)
        first = asyncio.create_task(engine.predict(image(), 2, "softmax"))
        await wait_started(backend)  # running, so out of the queue
        with pytest.raises(DeadlineExceededError):
            await engine.predict(image(), 5, "softmax", timeout=0.05)
        assert engine.queue_length == 0  # the worker is still busy, yet the late request left the queue
        gone = asyncio.create_task(engine.predict(image(), 6, "softmax"))
        await asyncio.sleep(0.01)
        assert engine.queue_length == 1
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert engine.queue_length == 0
        queued = asyncio.create_task(engine.predict(image(), 3, "softmax"))  # accepted: the place is free
        await asyncio.sleep(0.01)
        backend.gate.set()
        await first
        assert (await queued)[0].prediction.samples == 3
        await engine.stop()
        return backend.calls

    assert asyncio.run(scenario()) == [[2], [3]]


def test_a_model_failure_answers_its_batch_with_the_error_and_the_engine_carries_on() -> None:
    class FailingOnce(GatedBackend):
        def logits(self, images: torch.Tensor, samples: Sequence[int], seeds: Sequence[int | None]) -> torch.Tensor:
            if not self.calls:
                self.calls.append(list(samples))
                raise RuntimeError("out of memory")
            return super().logits(images, samples, seeds)

    async def scenario() -> list[list[int]]:
        backend = FailingOnce()
        backend.gate.set()
        engine = engine_with(backend)
        failed = await asyncio.gather(*(engine.predict(image(), m, "softmax") for m in (1, 2)),
                                      return_exceptions=True)
        assert [str(e) for e in failed] == ["out of memory", "out of memory"]
        assert (await engine.predict(image(), 3, "softmax"))[0].prediction.samples == 3
        await engine.stop()
        return backend.calls

    assert asyncio.run(scenario()) == [[1, 2], [3]]
