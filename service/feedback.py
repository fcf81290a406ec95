"""Prediction ids that carry their own answer, and the memory that lets each take feedback once.

An id is the answer (label, samples), the time it was issued and a random nonce, signed with an HMAC
whose key is ``SIAM_FEEDBACK_SECRET`` and the model's name. Any process with that secret reads it: another
worker, a model process restarted in place, another replica behind a proxy. So nothing needs to be kept
per prediction; the only memory is which ids have had their feedback (``FeedbackStore``), so that each
counts once. By default that memory is the process's own: a model process that was restarted, or another
replica, does not know which ids already had feedback and would count a second one again. Given a file
(``SIAM_FEEDBACK_DB``), it is a SQLite table that every process opening the file shares, on one host (a
Docker volume): restarts and replicas then count each id once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import sqlite3
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

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


class FeedbackUnavailableError(RuntimeError):
    """The file of taken ids could not be read or written in time (locked, disk full): 503, retry later. The
    feedback is not counted, so sending it again is safe."""

    retry_after_s = 1


class TakenInMemory:
    """This process's own memory: at most ``capacity`` nonces, the oldest forgotten first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._taken: OrderedDict[bytes, float] = OrderedDict()  # nonce -> when its id stops being valid anyway

    def first(self, nonce: bytes, expires: float, now: float) -> bool:
        """Mark ``nonce`` taken until ``expires``; True when it was not taken before."""
        if nonce in self._taken:
            return False
        self._taken[nonce] = expires
        while self._taken and (len(self._taken) > self.capacity or next(iter(self._taken.values())) < now):
            self._taken.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._taken)


class TakenInFile:
    """A SQLite table that every process opening ``path`` shares: a model process restarted in place, the
    model processes of ``--model-processes K``, replicas on one host with the file on a shared volume. A
    nonce stays until its id has expired anyway (the TTL bounds the file, not a capacity). WAL mode lets
    readers and one writer work at once; ``synchronous=NORMAL`` survives a process crash, not a power cut.
    Not for a network file system (SQLite's locks are unreliable there)."""

    PRUNE_EVERY_S = 60.0

    def __init__(self, path: Path, model: str, busy_timeout_s: float = 5.0):
        self.model = model
        self._lock = threading.Lock()
        try:  # autocommit; one connection, used from worker threads in turn (the lock)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS taken (model TEXT NOT NULL, nonce BLOB NOT NULL, "
                             "expires REAL NOT NULL, PRIMARY KEY (model, nonce)) WITHOUT ROWID")
        except (sqlite3.Error, OSError) as e:  # a start-up failure: the service says why and is not ready
            raise OSError(f"cannot use {path} as the feedback file (SIAM_FEEDBACK_DB): {e}") from e
        self._pruned = 0.0

    def first(self, nonce: bytes, expires: float, now: float) -> bool:
        with self._lock:
            try:
                if now - self._pruned >= self.PRUNE_EVERY_S:
                    self._db.execute("DELETE FROM taken WHERE expires < ?", (now,))
                    self._pruned = now
                cursor = self._db.execute("INSERT OR IGNORE INTO taken VALUES (?, ?, ?)", (self.model, nonce, expires))
            except sqlite3.Error as e:
                raise FeedbackUnavailableError(f"the feedback file could not be written: {e}") from e
        return cursor.rowcount == 1

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM taken WHERE model = ?", (self.model,)).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class FeedbackStore:
    """Which prediction ids have had their feedback, so that each counts once; what each id answered is read
    from the id itself. In this process's memory (at most ``capacity`` ids), or in the SQLite file ``path``."""

    def __init__(self, ids: PredictionIds, capacity: int, path: Path | None = None):
        self.ids = ids
        # Keyed on the signed nonce, not the id's text: two spellings of one id (base64's spare low bits in
        # the last character) must not count twice.
        self.taken: TakenInMemory | TakenInFile = (TakenInMemory(capacity) if path is None
                                                   else TakenInFile(path, ids.model))

    def take(self, prediction_id: str, now: float | None = None) -> Issued | None:
        """The answer ``prediction_id`` carries, once; None when it is not a valid id of this model, has
        expired, or has had its feedback. Raises FeedbackUnavailableError when the file cannot be written."""
        now = time.time() if now is None else now
        issued = self.ids.read(prediction_id, now)
        if issued is None or not self.taken.first(issued.nonce, issued.at + self.ids.ttl_s, now):
            return None
        return issued

    async def recall(self, prediction_id: str) -> Issued | None:
        """:meth:`take`, awaitable: a worker process asks a model process's store the same way
        (service/remote_engine.py). The file is written off the event loop (it may wait on another
        process's lock)."""
        if isinstance(self.taken, TakenInFile):
            return await asyncio.to_thread(self.take, prediction_id)
        return self.take(prediction_id)

    def close(self) -> None:
        if isinstance(self.taken, TakenInFile):
            self.taken.close()

    def __len__(self) -> int:
        return len(self.taken)
