"""Sequential sampling in the service: a request's images draw their copies in rounds through the engine.

Each round is an ordinary engine job, so the rounds of many requests (and fixed-m requests) share
batches; an image that is decided drops out of the next round, freeing its remaining rows at once. The
decision rule and its guarantee are :mod:`models.sequential`'s. The whole request keeps one deadline;
only the first round goes through deadline-aware admission (later rounds belong to a request already
admitted).
"""

from __future__ import annotations

import time

import torch

from models.sequential import SequentialVote, round_seed
from models.smooth import summarize
from models.spec import Aggregation
from service.engine import Answer, Engine
from service.remote_engine import RemoteEngine


async def predict_sequential(engine: Engine | RemoteEngine, images: torch.Tensor, budget: int, confidence: float,
                             aggregation: Aggregation, seed: int | None, timeout: float,
                             num_classes: int) -> list[Answer]:
    """Each image's answer from the copies it used (``prediction.samples``), and whether it was decided."""
    deadline = time.monotonic() + timeout
    votes = [SequentialVote(budget, confidence, num_classes, aggregation) for _ in range(images.shape[0])]
    first = True
    while active := [i for i, v in enumerate(votes) if v.next_round()]:
        # every image of a request follows one schedule, so the active ones all need the same round
        size, round_index = votes[active[0]].next_round(), votes[active[0]].round_index
        logits = await engine.copy_logits(images[active], size, round_seed(seed, round_index),
                                          deadline - time.monotonic(), admit=first)
        first = False
        for i, part in zip(active, logits, strict=True):
            votes[i].add(part)
    answers = [Answer(summarize(v.all_logits(), [v.used], aggregation)[0], None, v.decided) for v in votes]
    engine.record(answers, budget)
    return answers
