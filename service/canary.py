"""The background canary: re-score the checkpoint's canary set through the live engine, now and then.

The canary's jobs are small (a few images) and only one is outstanding at a time, so live traffic
waits at most one small job behind it; if the queue is full the round is skipped, not forced in.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from models.canary import load_canary
from service.engine import DeadlineExceededError, QueueFullError, ShuttingDownError
from service.state import ServiceState

log = logging.getLogger("siam.canary")
JOB_IMAGES = 4


async def score(state: ServiceState, images_by_set: dict[str, torch.Tensor], labels: torch.Tensor,
                samples: list[int]) -> dict[tuple[str, int], float]:
    """Accuracy of each canary set at each m, through the same engine live requests use."""
    engine, manifest = state.engine, state.manifest
    assert engine is not None and manifest is not None
    result: dict[tuple[str, int], float] = {}
    for name, images in images_by_set.items():
        for m in samples:
            correct = 0
            for i in range(0, images.shape[0], JOB_IMAGES):
                answers = await engine.predict(images[i:i + JOB_IMAGES], m, manifest.spec.smoothing.aggregation,
                                               timeout=state.settings.request_timeout_s, internal=True)
                correct += sum(int(a.prediction.label == int(y))
                               for a, y in zip(answers, labels[i:i + JOB_IMAGES], strict=True))
            result[(name, m)] = correct / images.shape[0]
    return result


async def run_canary_forever(state: ServiceState) -> None:
    canary = await asyncio.to_thread(load_canary, state.settings.checkpoint)
    if canary is None:
        log.warning("canary enabled but %s has no canary set (make one with siam export --canary N)",
                    state.settings.checkpoint)
        return
    sets = {k: v for k, v in canary.images.items() if k == "clean" or state.settings.canary_attacked}
    while True:
        try:
            accuracies = await score(state, sets, canary.labels, state.settings.canary_sample_list())
        except (QueueFullError, DeadlineExceededError):
            log.warning("canary round skipped: the service is busy")
        except ShuttingDownError:
            return
        else:
            for (name, m), acc in accuracies.items():
                state.metrics.canary_accuracy.labels(state.model_name, str(m), name).set(acc)
            state.metrics.canary_last_run.set(time.time())
            log.info("canary", extra={"fields": {f"{n}@{m}": a for (n, m), a in accuracies.items()}})
        await asyncio.sleep(state.settings.canary_interval_s)
