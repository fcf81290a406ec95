"""The messages between the HTTP worker processes and the model process (``SIAM_WORKERS`` > 1).

A frame is two big-endian lengths, a JSON header and a raw payload (the images, or a round's logits, as
float32 bytes): images cross as their bytes, with no pickling and nothing executable. Answers cross as
JSON numbers, which round-trip floats exactly, so an answer is the same number whichever process made it.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import torch

from models.smooth import Certificate, Prediction
from service.engine import Answer, DeadlineExceededError, OverloadedError, QueueFullError, ShuttingDownError
from service.feedback import FeedbackUnavailableError

PREFIX = struct.Struct("!II")  # header bytes, payload bytes
MAX_HEADER = 64 * 1024 * 1024  # an answer for max_images images with 1000 classes stays far below this


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    """The next frame; raises ``asyncio.IncompleteReadError`` when the other side has closed."""
    header_size, payload_size = PREFIX.unpack(await reader.readexactly(PREFIX.size))
    if header_size > MAX_HEADER:
        raise ValueError(f"frame header of {header_size} bytes: not a siam peer")
    header = json.loads(await reader.readexactly(header_size))
    payload = await reader.readexactly(payload_size) if payload_size else b""
    return header, payload


def frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return PREFIX.pack(len(encoded), len(payload)) + encoded + payload


def tensor_bytes(tensor: torch.Tensor) -> tuple[list[int], bytes]:
    """A float32 tensor's shape and bytes."""
    return list(tensor.shape), tensor.detach().to(torch.float32).contiguous().numpy().tobytes()


def tensor_from(shape: list[int], payload: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(payload), dtype=torch.float32).view(shape)


def encode_answers(answers: list[Answer]) -> list[list[Any]]:
    out = []
    for a in answers:
        p, c = a.prediction, a.certificate
        out.append([[p.label, p.probabilities, p.vote_share, p.samples],
                    None if c is None else [c.label, c.radius, c.p_lower, c.counts], a.decided])
    return out


def decode_answers(encoded: list[list[Any]]) -> list[Answer]:
    return [Answer(Prediction(*p), None if c is None else Certificate(*c), decided) for p, c, decided in encoded]


# The engine's refusals, by the name that crosses the wire; anything else is a model failure.
ERRORS: dict[str, type[Exception]] = {"queue_full": QueueFullError, "deadline": DeadlineExceededError,
                                      "shutting_down": ShuttingDownError, "overloaded": OverloadedError,
                                      "feedback_unavailable": FeedbackUnavailableError}


class ModelProcessError(RuntimeError):
    """The model process failed a batch (the single-process service answers the same failure 500)."""


def encode_error(error: Exception) -> dict[str, Any]:
    for kind, cls in ERRORS.items():
        if isinstance(error, cls):
            return {"error": kind, "message": str(error), "retry_after": getattr(error, "retry_after_s", 1)}
    return {"error": "internal", "message": f"{type(error).__name__}: {error}"}


def decode_error(header: dict[str, Any]) -> Exception:
    kind, message = header["error"], header["message"]
    if kind == "overloaded":
        return OverloadedError(message, int(header["retry_after"]))
    return ERRORS.get(kind, ModelProcessError)(message)
