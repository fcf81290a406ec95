"""argparse types for counts and durations, so a bad number is refused when the command line is read,
with the flag's name, before any data or model loads (not as a traceback minutes later); and the check
that a long run's output folder can be written, made before the run rather than after it."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def positive_int(text: str) -> int:
    """A count that must be at least 1 (epochs, images, steps, threads)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """Comma-separated counts (m values, clients, chunk sizes), each at least 1, and at least one of them."""
    values = [positive_int(x) for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError("needs at least one value")
    return values


def non_negative_int(text: str) -> int:
    """A count where 0 means none (the canary set's images)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A duration in seconds that must be above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A size or rate where 0 is allowed and a negative value is meaningless (sigma, eps, learning rate)."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """A failure probability or a confidence, strictly between 0 and 1 (CERTIFY's alpha, a stopping confidence)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def stopping_confidence(text: str) -> float:
    """Sequential sampling's confidence: above 1/2 (a vote decided at less says nothing) and below 1."""
    value = float(text)
    if not 0.5 < value < 1:
        raise argparse.ArgumentTypeError(f"must be above 0.5 and below 1, got {text}")
    return value


def stopping_confidence_or_off(text: str) -> float:
    """A stopping confidence, or 0 for "do not run sequential sampling" (the report's switch)."""
    return 0.0 if float(text) == 0 else stopping_confidence(text)


def unwritable(folder: Path) -> str | None:
    """Why files could not be written into ``folder`` (created if missing), or None if they can. Nothing is
    created: the nearest existing folder on the way is probed with a temporary file."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"{existing}: {e.strerror or e}"
    return None
