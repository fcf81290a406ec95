"""An HTTP worker's view of the model process (``SIAM_WORKERS`` > 1): the engine's request interface,
answered over the model process's Unix socket.

The routers cannot tell :class:`RemoteEngine` from :class:`service.engine.Engine`: the same calls, the
same answers, the same refusals (503 queue full or overloaded, 504 past the deadline). A request whose
client leaves is cancelled in the model process too, so its rows are dropped there. Which prediction ids
had feedback is remembered in the model process, so feedback for a prediction may reach any worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from models.spec import Aggregation
from service.engine import SHED_MESSAGE, Answer, DeadlineExceededError, ShuttingDownError, record_answers
from service.feedback import Issued
from service.metrics import Metrics
from service.wire import decode_answers, decode_error, frame, read_frame, tensor_bytes, tensor_from

log = logging.getLogger("siam.worker")
# A request's own deadline is kept by the model process's engine; this margin past it only guards against
# a model process that stopped answering without closing its socket.
SILENCE_MARGIN_S = 5.0


class ModelLostError(ShuttingDownError):
    """The model process this request went to died; the supervisor is starting another (503, Retry-After 1)."""


def owner(prediction_id: str, processes: int) -> int:
    """Which of ``processes`` model processes remembers that ``prediction_id`` had its feedback: a hash of the
    id, so that every worker asks the same one. (Any of them could read the id: it carries its answer.)"""
    return zlib.crc32(prediction_id.encode("utf-8", "replace")) % processes


class FeedbackRouter:
    """The feedback store of ``--model-processes K`` as a worker sees it: the model process :func:`owner` names
    remembers which ids had feedback, so that feedback through any worker counts once."""

    def __init__(self, links: list[RemoteEngine]):
        self.links = links

    async def recall(self, prediction_id: str) -> Issued | None:
        return await self.links[owner(prediction_id, len(self.links))].recall(prediction_id)


class RemoteRuntime:
    """What the routers read of the backend (``/v1/models``, KServe metadata), as the model process told it."""

    def __init__(self, name: str, chunk_rows: int, runtime: dict[str, Any]):
        self.name, self.chunk_rows, self._runtime = name, chunk_rows, runtime

    def describe(self) -> dict[str, Any]:
        return dict(self._runtime)


async def connect(path: Path, retry_s: float = 0.05, stop: Callable[[], bool] = lambda: False,
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
    """Connect to the model process (retrying while it starts) and read its hello, sent once it has loaded.
    Raises ConnectionAbortedError once ``stop()`` holds: a model process that failed to load closes its
    socket, and a worker that came too late would otherwise retry until its supervisor killed it."""
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if stop():
                raise ConnectionAbortedError(f"stopped before the model process at {path} answered") from None
            await asyncio.sleep(retry_s)
    header, _ = await read_frame(reader)
    return reader, writer, header


class RemoteEngine:
    """``predict``, ``copy_logits``, ``record``, ``shed`` and ``stop`` of :class:`service.engine.Engine`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, model_name: str,
                 metrics: Metrics, on_lost: Callable[[], None] = lambda: None):
        self.model_name, self.metrics = model_name, metrics
        self._reader, self._writer = reader, writer
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[tuple[dict[str, Any], bytes]]] = {}
        self._lost = False
        self._on_lost = on_lost
        self._listener = asyncio.create_task(self._listen(), name="siam-model-link")

    async def _listen(self) -> None:
        try:
            while True:
                header, payload = await read_frame(self._reader)
                future = self._waiting.pop(header["id"], None)
                if future is not None and not future.done():
                    future.set_result((header, payload))
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            self._lost = True
            log.error("the model process closed its connection: %s", type(e).__name__)
            self._fail_waiting("the model process stopped", ModelLostError)
            self._on_lost()

    async def _call(self, header: dict[str, Any], payload: bytes = b"",
                    timeout: float = 30.0) -> tuple[dict[str, Any], bytes]:
        if self._lost:
            raise ModelLostError("the model process stopped")
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        future = self._waiting[rid] = loop.create_future()
        self._writer.write(frame({"id": rid, **header}, payload))
        silence = loop.call_later(timeout + SILENCE_MARGIN_S, self._give_up, rid, timeout)
        try:
            answer, data = await future
        except asyncio.CancelledError:  # the client left (or shutdown): the model process drops the rows too
            if self._waiting.pop(rid, None) is not None and not self._lost:
                self._writer.write(frame({"op": "cancel", "id": rid}))
            raise
        finally:
            silence.cancel()
        if "error" in answer:
            raise decode_error(answer)
        return answer, data

    def _give_up(self, rid: int, timeout: float) -> None:
        future = self._waiting.pop(rid, None)
        if future is not None and not future.done():
            future.set_exception(DeadlineExceededError(f"no answer from the model process within {timeout:g} s"))

    async def predict(self, images: torch.Tensor, samples: int, aggregation: Aggregation,
                      seed: int | None = None, certify_alpha: float | None = None,
                      selection_samples: int = 64, timeout: float = 30.0, internal: bool = False) -> list[Answer]:
        shape, data = tensor_bytes(images)
        answer, _ = await self._call({"op": "predict", "shape": shape, "samples": samples, "aggregation": aggregation,
                                      "seed": seed, "alpha": certify_alpha, "selection": selection_samples,
                                      "timeout": timeout, "internal": internal}, data, timeout)
        return decode_answers(answer["answers"])

    async def copy_logits(self, images: torch.Tensor, copies: int, seed: int | None, timeout: float,
                          admit: bool = True) -> list[torch.Tensor]:
        shape, data = tensor_bytes(images)
        answer, logits = await self._call({"op": "logits", "shape": shape, "samples": copies, "seed": seed,
                                           "timeout": timeout, "admit": admit}, data, timeout)
        return list(tensor_from(answer["shape"], logits).unbind(0))

    def record(self, answers: list[Answer], samples: int) -> None:
        record_answers(self.metrics, self.model_name, answers, samples)

    def _fail_waiting(self, message: str, error: type[ShuttingDownError] = ShuttingDownError) -> int:
        """Answer every request still waiting on the model process with ShuttingDownError (503), asking the
        model process (while it is there) to drop their rows. Returns how many were answered."""
        failed = 0
        for rid, future in self._waiting.items():
            if not future.done():
                future.set_exception(error(message))
                failed += 1
                if not self._lost:
                    self._writer.write(frame({"op": "cancel", "id": rid}))
        self._waiting.clear()
        return failed

    def shed(self) -> int:
        """Answer every request still waiting on the model process 503 (the grace period is ending)."""
        return self._fail_waiting(SHED_MESSAGE)

    def close(self) -> None:
        """Close the connection now, owing nothing (it was lost, or never used)."""
        self._listener.cancel()
        self._writer.close()

    async def stop(self) -> None:
        """Wait for the answers still owed (uvicorn has finished or shed the requests by now), then close."""
        while self._waiting and not self._lost:
            await asyncio.sleep(0.01)
        self._listener.cancel()
        self._writer.close()

    # the feedback store, kept by the model process

    async def recall(self, prediction_id: str) -> Issued | None:
        answer, _ = await self._call({"op": "recall", "prediction": prediction_id})
        issued = answer["issued"]
        return None if issued is None else Issued(*issued)
