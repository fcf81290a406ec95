"""Who may ask for predictions, and how often: optional API keys and a per-client token bucket.

Keys are never stored, only their SHA-256 (a file of hex digests, one per line, ``#`` comments allowed),
so the file can be shared with config management without leaking a key. A client sends its key as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. The rate limit is a token bucket per key (per
client address when keys are off): ``rate_limit_per_s`` tokens a second, ``rate_limit_burst`` at most;
an empty bucket answers 429 with the seconds until the next token: rounded up in ``Retry-After`` (which
counts whole seconds) and exact in the body's ``retry_after_s``, which ``siam predict`` waits instead.

``siam api-key`` prints a new random key and the line to add to the keys file.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from fastapi import Request

from service.images import InputError

# The two ways to send a key, as the OpenAPI document describes them (service/app.py adds them to every
# route that runs require_access). The headers are read by hand in one plain dependency: FastAPI's
# HTTPBearer and APIKeyHeader as sub-dependencies cost about 0.1 ms a request in its dependency solver.
SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "HTTPBearer": {"type": "http", "scheme": "bearer",
                   "description": "an API key, when the server has SIAM_API_KEYS"},
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                     "description": "the same API key, as a header"},
}


class AccessError(InputError):
    """401 or 429, with the headers the status calls for."""

    def __init__(self, message: str, status: int, kind: str, headers: dict[str, str],
                 retry_after_s: float | None = None):
        super().__init__(message, status, kind)
        self.headers = headers
        self.retry_after_s = retry_after_s  # the exact wait, for the body: ``Retry-After`` counts whole seconds


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_key_hashes(path: Path) -> frozenset[str]:
    """The SHA-256 hex digests in ``path``; refuses a file with anything else, so a plain key pasted by
    mistake is an error at start-up rather than a key that silently never matches."""
    hashes = set()
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip().lower()
        if not line:
            continue
        if len(line) != 64 or any(c not in "0123456789abcdef" for c in line):
            raise ValueError(f"{path.name}:{number}: not a SHA-256 hex digest (use `siam api-key` to make one)")
        hashes.add(line)
    if not hashes:
        raise ValueError(f"{path.name} holds no key hashes: every request would be refused")
    return frozenset(hashes)


class TokenBuckets:
    """One token bucket per client, the least recently seen forgotten beyond ``capacity`` clients
    (bounded memory whatever addresses arrive)."""

    def __init__(self, rate: float, burst: int, capacity: int = 10_000):
        self.rate, self.burst, self.capacity = rate, burst, capacity
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def take(self, client: str, now: float | None = None) -> float:
        """Take a token; returns 0.0 when granted, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[client] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        while len(self._buckets) > self.capacity:
            self._buckets.popitem(last=False)
        return wait


class Access:
    """The check every prediction route runs (a FastAPI dependency)."""

    def __init__(self, key_hashes: frozenset[str] | None, rate: float, burst: int):
        self.key_hashes = key_hashes
        self.buckets = TokenBuckets(rate, burst) if rate > 0 else None

    def check(self, request: Request, key: str | None) -> None:
        client = request.client.host if request.client else "unknown"
        if self.key_hashes is not None:
            digest = hash_key(key) if key else ""
            if not any(secrets.compare_digest(digest, h) for h in self.key_hashes):
                raise AccessError("missing or unknown API key: send `Authorization: Bearer <key>` or `X-API-Key`",
                                  401, "unauthorized", {"WWW-Authenticate": "Bearer"})
            client = "key:" + digest[:16]
        if self.buckets is not None:
            wait = self.buckets.take(client)
            if wait > 0:
                raise AccessError(f"rate limit of {self.buckets.rate:g} requests/s exceeded; retry in {wait:.2f} s",
                                  429, "rate_limited", {"Retry-After": str(max(1, math.ceil(wait)))},
                                  retry_after_s=round(wait, 3))


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>`` (the scheme in any case), else ``X-API-Key``."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return headers.get("x-api-key") or None


async def require_access(request: Request) -> None:
    """FastAPI dependency: 401 / 429 unless the server lets this client predict now."""
    access: Access | None = request.app.state.siam.access
    if access is not None:
        access.check(request, presented_key(request.headers))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="siam api-key", description="Print a new random API key and the line "
                                     "(its SHA-256) to append to the file SIAM_API_KEYS names. The server never "
                                     "sees the key itself until a client sends it.")
    parser.add_argument("--name", default="", help="a comment to put beside the hash (whose key it is)")
    args = parser.parse_args(argv)
    key = secrets.token_urlsafe(32)
    print(f"key:  {key}")
    print(f"line: {hash_key(key)}" + (f"  # {args.name}" if args.name else ""))
