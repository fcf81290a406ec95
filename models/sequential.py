"""Sequential sampling: draw an image's noisy copies in rounds and stop as soon as its vote is decided.

``samples`` becomes a budget. Copies come in rounds of 16, then as many as drawn so far (16, 16, 32,
64, ... : the total doubles), the last round cut to the budget. After each round the image's vote
counts are tested as in Cohen et al.'s PREDICT: a two-sided binomial test of the top class's count
``n_A`` against the runner-up's ``n_B`` out of ``n_A + n_B`` at p = 1/2. An image whose test rejects
at level ``alpha / L`` (``L`` the number of rounds the budget allows, ``alpha = 1 - confidence``) is
*decided* and stops. Guarantee (union bound over the ``L`` looks): the probability that the procedure
stops with a class other than the smoothed vote classifier's top class is at most ``alpha``, whatever
the image. An image that is never decided answers from all its copies, as without sequential sampling.

:class:`SequentialVote` is the whole procedure for one image; ``Smooth.predict_sequential``, the
service's engine and ``siam evaluate`` drive it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.noise import row_seed
from models.stats import sign_test_p

FIRST_ROUND = 16


def rounds(budget: int, first: int = FIRST_ROUND) -> list[int]:
    """Copies drawn in each round for ``budget`` copies: ``first``, then doubling the total."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    sizes: list[int] = []
    total, size = 0, min(first, budget)
    while total < budget:
        size = min(size, budget - total)
        sizes.append(size)
        total += size
        size = total
    return sizes


def round_seed(seed: int | None, round_index: int) -> int | None:
    """A fixed seed per round, so rounds draw independent noise and a seeded request is reproducible."""
    if seed is None or round_index == 0:
        return seed
    return row_seed(seed, (1 << 40) + round_index)


def vote_decided(counts: torch.Tensor, alpha: float) -> bool:
    """Does the top class beat the runner-up at level ``alpha`` (Cohen's PREDICT test)? A tie never does:
    its p-value is 1."""
    n_a, n_b = (int(v) for v in counts.topk(2).values)
    return sign_test_p(n_a, n_a + n_b) <= alpha


@dataclass
class SequentialVote:
    """One image's sequential sampling: ask :meth:`next_round` how many copies to draw, hand their logits
    to :meth:`add`, until ``next_round()`` is 0; then ``all_logits()`` holds every copy drawn, for the
    answer under ``aggregation``."""

    budget: int
    confidence: float
    num_classes: int
    aggregation: str = "vote"
    schedule: list[int] = field(init=False)
    logits: list[torch.Tensor] = field(init=False, default_factory=list)
    counts: torch.Tensor = field(init=False)
    used: int = field(init=False, default=0)
    decided: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0.5, 1), got {self.confidence}")
        self.schedule = rounds(self.budget)
        self.counts = torch.zeros(self.num_classes, dtype=torch.long)

    @property
    def alpha_per_look(self) -> float:
        return (1 - self.confidence) / len(self.schedule)

    @property
    def round_index(self) -> int:
        """How many rounds have been added."""
        return len(self.logits)

    def next_round(self) -> int:
        """Copies to draw next; 0 once decided or out of budget."""
        if self.decided or self.round_index >= len(self.schedule):
            return 0
        return self.schedule[self.round_index]

    def add(self, logits: torch.Tensor) -> None:
        """The logits ``[n, C]`` of the round's copies; updates the counts and the decision."""
        expected = self.next_round()
        if logits.shape[0] != expected:
            raise ValueError(f"round {self.round_index} needs {expected} copies, got {logits.shape[0]}")
        self.logits.append(logits)
        self.used += logits.shape[0]
        self.counts += torch.bincount(logits.argmax(1).cpu(), minlength=self.num_classes)
        # Decided: the vote is settled, and the answer the aggregation rule gives names the same class
        # (mean softmax or mean logits can rarely disagree with the vote; then more copies are drawn).
        self.decided = vote_decided(self.counts, self.alpha_per_look) and self._aggregate_label() == int(
            self.counts.argmax())

    def _aggregate_label(self) -> int:
        if self.aggregation == "vote":
            return int(self.counts.argmax())
        stacked = self.all_logits().float()
        scores = stacked.softmax(1).mean(0) if self.aggregation == "softmax" else stacked.mean(0)
        return int(scores.argmax())

    def all_logits(self) -> torch.Tensor:
        return torch.cat(self.logits)
