"""Prediction ids that carry their own answer, and the memory that lets each take feedback once.

An id is the answer (label, samples), the time it was issued and a random nonce, signed with an HMAC
whose key is ``SIAM_FEEDBACK_SECRET`` and the model's name. Any process with that secret reads it: another
worker, a model process restarted in place, another replica behind a proxy. So nothing needs to be kept
per prediction; the only memory is which ids have had their feedback (``FeedbackStore``), so that each
counts once. That memory is per process: a model process that was restarted, or another replica, does
not know which ids already had feedback and would count a second one again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass

PAYLOAD = struct.Struct(">8sHId")  # nonce, label, samples, issued at (Unix seconds)
TAG_BYTES = 10  # 80 bits of HMAC-SHA256: forging one id takes 2^80 tries
ID_BYTES = PAYLOAD.size + TAG_BYTES


@dataclass(frozen=True)
class Issued:
    """What the service answered for one prediction id."""

    label: int
    samples: int
    model: str
    at: float  # Unix seconds
    nonce: bytes = b""  # what makes the id unique: feedback is counted once per nonce


class PredictionIds:
    """Issues and reads signed prediction ids for one model; an id signed for another model or with another
    secret, altered, or older than ``ttl_s`` reads as None."""

    def __init__(self, secret: str, model: str, ttl_s: float):
        self.model, self.ttl_s = model, ttl_s
        self._key = hmac.new(secret.encode(), b"siam prediction id\0" + model.encode(), hashlib.sha256).digest()

    def _tag(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:TAG_BYTES]

    def issue(self, label: int, samples: int, now: float | None = None) -> str:
        payload = PAYLOAD.pack(secrets.token_bytes(8), label, samples, time.time() if now is None else now)
        return base64.urlsafe_b64encode(payload + self._tag(payload)).decode().rstrip("=")

    def read(self, prediction_id: str, now: float | None = None) -> Issued | None:
        try:  # validate: otherwise characters outside the alphabet would be skipped, not refused
            raw = base64.b64decode(prediction_id + "=" * (-len(prediction_id) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):  # not base64, or not ASCII
            return None
        if len(raw) != ID_BYTES:
            return None
        payload, tag = raw[:PAYLOAD.size], raw[PAYLOAD.size:]
        if not hmac.compare_digest(tag, self._tag(payload)):
            return None
        nonce, label, samples, at = PAYLOAD.unpack(payload)
        if not 0 <= (time.time() if now is None else now) - at <= self.ttl_s:
            return None
        return Issued(label, samples, self.model, at, nonce)


class FeedbackStore:
    """Which prediction ids have had their feedback (at most ``capacity``, the oldest forgotten first), so
    that each counts once; what each id answered is read from the id itself."""

    def __init__(self, ids: PredictionIds, capacity: int):
        self.ids, self.capacity = ids, capacity
        # nonce -> when its id stops being valid anyway. Keyed on the signed nonce, not the id's text: two
        # spellings of one id (base64's spare low bits in the last character) must not count twice.
        self._taken: OrderedDict[bytes, float] = OrderedDict()

    def take(self, prediction_id: str, now: float | None = None) -> Issued | None:
        """The answer ``prediction_id`` carries, once; None when it is not a valid id of this model, has
        expired, or has had its feedback."""
        now = time.time() if now is None else now
        issued = self.ids.read(prediction_id, now)
        if issued is None or issued.nonce in self._taken:
            return None
        self._taken[issued.nonce] = issued.at + self.ids.ttl_s
        while self._taken and (len(self._taken) > self.capacity or next(iter(self._taken.values())) < now):
            self._taken.popitem(last=False)
        return issued

    async def recall(self, prediction_id: str) -> Issued | None:
        """:meth:`take`, awaitable: a worker process asks a model process's store the same way
        (service/remote_engine.py)."""
        return self.take(prediction_id)

    def __len__(self) -> int:
        return len(self._taken)
