"""Which prediction said what, kept just long enough for a client to report the true label."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Issued:
    """What the service answered for one prediction id."""

    label: int
    samples: int
    model: str
    at: float


class FeedbackStore:
    """A bounded, expiring map from prediction id to its answer; the oldest ids go first."""

    def __init__(self, capacity: int, ttl_s: float):
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, Issued] = OrderedDict()

    def add(self, prediction_id: str, label: int, samples: int, model: str) -> None:
        self._items[prediction_id] = Issued(label, samples, model, time.monotonic())
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def take(self, prediction_id: str) -> Issued | None:
        """The answer for ``prediction_id`` (once: feedback counts a prediction one time), or None
        when the id is unknown, expired or already used."""
        issued = self._items.pop(prediction_id, None)
        if issued is None or time.monotonic() - issued.at > self.ttl_s:
            return None
        return issued

    # The routers' calls: awaitable, so that a worker process can ask the model process's store instead
    # (service/remote_engine.py), and feedback for a prediction may reach any worker.

    async def remember(self, entries: list[tuple[str, int, int, str]]) -> None:
        """Keep (id, label, samples, model) of each answered prediction."""
        for entry in entries:
            self.add(*entry)

    async def recall(self, prediction_id: str) -> Issued | None:
        return self.take(prediction_id)

    def __len__(self) -> int:
        return len(self._items)
