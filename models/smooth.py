"""The smoothed classifier: answer with the aggregate of the base model over m noisy copies.

``g(x) = aggregate_{i=1..m} f(x + sigma * eps_i)``, ``eps_i ~ N(0, I)``, never clipped; with PNI-W
layers each copy also draws its own weight noise. ``predict_batch`` is the serving path (several
images, each with its own m); ``predict`` and ``certify`` are Cohen, Rosenfeld & Kolter's (2019)
abstaining prediction and certified L2 radius, as in their ``core.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.noise import DeviceNoise, NoiseSource, SeededNoise
from models.pni import has_weight_noise, per_row_weight_noise
from models.resnet import Classifier
from models.sequential import SequentialVote, round_seed
from models.spec import Aggregation, SmoothingSpec
from models.stats import clopper_pearson_lower, normal_ppf, sign_test_p

ABSTAIN = -1

Segment = tuple[int, int, int]
"""``(image index, first copy, end copy)``: a run of one image's noisy copies inside a chunk."""


@dataclass(frozen=True)
class Prediction:
    """One image's smoothed answer."""

    label: int
    probabilities: list[float]
    vote_share: float
    samples: int


@dataclass(frozen=True)
class Certificate:
    """Cohen's CERTIFY result: ``label == ABSTAIN`` and ``radius == 0`` when it abstains."""

    label: int
    radius: float
    p_lower: float
    counts: list[int]

    @property
    def abstained(self) -> bool:
        return self.label == ABSTAIN


def plan_chunks(samples: Sequence[int], chunk_rows: int) -> Iterator[list[Segment]]:
    """Split ``sum(samples)`` noisy rows into chunks of at most ``chunk_rows`` rows, in order."""
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    chunk: list[Segment] = []
    room = chunk_rows
    for image, m in enumerate(samples):
        start = 0
        while start < m:
            take = min(room, m - start)
            chunk.append((image, start, start + take))
            start += take
            room -= take
            if room == 0:
                yield chunk
                chunk, room = [], chunk_rows
    if chunk:
        yield chunk


def rows_of_chunk(images: torch.Tensor, chunk: list[Segment]) -> torch.Tensor:
    """The rows of one chunk: each of its images repeated once per copy, in one ``repeat_interleave`` (not a
    copy per image). A chunk's images are consecutive unless an image with no copies lies between them."""
    index = [image for image, _, _ in chunk]
    picked = images[index[0] : index[-1] + 1] if index[-1] - index[0] + 1 == len(index) else images[index]
    copies = [stop - start for _, start, stop in chunk]
    return picked.repeat_interleave(torch.tensor(copies, device=images.device), dim=0, output_size=sum(copies))


def aggregate(logits: torch.Tensor, image_of_row: torch.Tensor, num_images: int,
              aggregation: Aggregation) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image scores ``[num_images, C]`` (probabilities or vote shares) and vote counts.

    ``vote``: share of copies whose argmax is each class; ``softmax``: mean softmax;
    ``logits``: softmax of the mean logits.
    """
    classes = logits.shape[1]
    logits = logits.float()
    counts = torch.zeros(num_images, device=logits.device).index_add_(
        0, image_of_row, torch.ones_like(image_of_row, dtype=torch.float32))
    votes = torch.zeros(num_images, classes, device=logits.device).index_add_(
        0, image_of_row, F.one_hot(logits.argmax(1), classes).float())
    if aggregation == "vote":
        scores = votes / counts[:, None]
    elif aggregation == "softmax":
        scores = torch.zeros_like(votes).index_add_(0, image_of_row, logits.softmax(1)) / counts[:, None]
    elif aggregation == "logits":
        mean = torch.zeros_like(votes).index_add_(0, image_of_row, logits) / counts[:, None]
        scores = mean.softmax(1)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected vote, softmax or logits")
    return scores, votes


def summarize(logits: torch.Tensor, counts: Sequence[int], aggregation: Aggregation) -> list[Prediction]:
    """One :class:`Prediction` per image from the logits of its ``counts[i]`` consecutive noisy copies.

    In NumPy, after one copy to the host (the answers go there anyway): a serving thread calls this once per
    batch, and every torch call releases the GIL, which under load the HTTP thread may then hold for up to a
    switch interval each time; NumPy keeps it on arrays this small. (:func:`aggregate` is the differentiable
    torch version that attacks use.)"""
    if logits.requires_grad or logits.device.type != "cpu" or logits.dtype != torch.float32:
        logits = logits.detach().float().cpu()  # (serving backends hand over float32 on the CPU already)
    return summarize_numpy(logits.numpy(), counts, aggregation)


def summarize_numpy(logits: np.ndarray, counts: Sequence[int], aggregation: Aggregation) -> list[Prediction]:
    """:func:`summarize` in NumPy: the same three rules as :func:`aggregate`, over each image's run of rows."""
    n, classes = len(counts), logits.shape[1]
    if n == 0:
        return []
    m = np.asarray(counts, dtype=np.float32)[:, None]
    starts = None if all(c == counts[0] for c in counts) else np.cumsum([0, *counts[:-1]])

    def per_image_sum(rows: np.ndarray) -> np.ndarray:
        """Each image's rows summed: a reshape when all have m copies (a request's images), else by runs."""
        return rows.reshape(n, counts[0], -1).sum(1) if starts is None else np.add.reduceat(rows, starts, axis=0)

    votes = per_image_sum((logits.argmax(1)[:, None] == np.arange(classes)).astype(np.float32))
    if aggregation == "vote":
        scores = votes / m
    elif aggregation == "softmax":
        scores = per_image_sum(softmax_numpy(logits)) / m
    elif aggregation == "logits":
        scores = softmax_numpy(per_image_sum(logits) / m)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected vote, softmax or logits")
    labels = scores.argmax(1)
    shares = votes[np.arange(n), labels] / m[:, 0]
    return [
        Prediction(int(label), probs, float(share), int(c))
        for label, probs, share, c in zip(labels.tolist(), scores.tolist(), shares.tolist(), counts, strict=True)
    ]


def softmax_numpy(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row's maximum as torch's is."""
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def certify_from_counts(selection: torch.Tensor, counts: torch.Tensor, alpha: float, sigma: float) -> Certificate:
    """Cohen's CERTIFY given class counts of the selection copies and of the (independent) estimation copies.

    The radius is ``sigma * Phi^-1(p_lower)``; with probability >= 1 - alpha the smoothed vote
    classifier is constant within it (in the space sigma is measured in).
    """
    label = int(selection.argmax())
    n = int(counts.sum())
    p_lower = clopper_pearson_lower(int(counts[label]), n, alpha)
    if p_lower < 0.5:
        return Certificate(ABSTAIN, 0.0, p_lower, counts.tolist())
    return Certificate(label, sigma * normal_ppf(p_lower), p_lower, counts.tolist())


class Smooth:
    """A base classifier smoothed with Gaussian input noise (and its own PNI weight noise)."""

    def __init__(self, model: Classifier, smoothing: SmoothingSpec, num_classes: int,
                 chunk_rows: int = 256, per_row_weight_noise: bool = True):
        """``per_row_weight_noise=False`` keeps PNI's one-draw-per-forward (its training behaviour)."""
        self.model = model
        self.smoothing = smoothing
        self.sigma = smoothing.sigma
        self.num_classes = num_classes
        self.chunk_rows = chunk_rows
        self._per_row_pni = per_row_weight_noise and has_weight_noise(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- the noisy forward pass --------------------------------------------------------------

    def _forward_rows(self, rows: torch.Tensor, source: NoiseSource) -> torch.Tensor:
        """Base-model logits for one chunk of rows, each with its own input (and weight) noise."""
        noise = source.normal(rows.shape[1:], dtype=rows.dtype) * self.sigma
        if self._per_row_pni:
            with per_row_weight_noise(self.model, source):
                return self._noisy_forward(rows, noise)
        return self._noisy_forward(rows, noise)

    def forward_noisy(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Base-model logits of ``rows`` under one fresh noise draw per row; differentiable, so the
        attacks use it to go through exactly the randomness the served model uses."""
        return self._forward_rows(rows, DeviceNoise(rows.shape[0], rows.device, generator))

    def _noisy_forward(self, rows: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.smoothing.space == "pixel":
            return self.model(rows + noise)
        return self.model(rows, normalized_noise=noise)

    def noisy_logits(self, images: torch.Tensor, samples: Sequence[int],
                     seeds: Sequence[int | None] | None = None) -> torch.Tensor:
        """Logits of every noisy copy, ``[sum(samples), C]``, image by image in order.

        Seeded images draw from per-copy generators (so their rows are identical whatever shares
        the batch); the others draw from the device's default generator.
        """
        if len(samples) != images.shape[0]:
            raise ValueError(f"{len(samples)} sample counts for {images.shape[0]} images")
        if seeds is not None and any(s is not None for s in seeds):
            return self._mixed_seed_logits(images, samples, seeds)
        out = []
        with torch.inference_mode():
            for chunk in plan_chunks(samples, self.chunk_rows):
                out.append(self.fresh_forward(rows_of_chunk(images, chunk)))
        return torch.cat(out) if out else images.new_zeros((0, self.num_classes))

    def fresh_forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits of one chunk of rows, each under a fresh draw of the device's generator: the unseeded
        serving path, which a backend may replace on the instance (CUDA graphs: service/cuda_graphs.py)."""
        return self._forward_rows(rows, DeviceNoise(rows.shape[0], rows.device))

    def _mixed_seed_logits(self, images: torch.Tensor, samples: Sequence[int],
                           seeds: Sequence[int | None]) -> torch.Tensor:
        seeded = [i for i, s in enumerate(seeds) if s is not None]
        unseeded = [i for i, s in enumerate(seeds) if s is None]
        pieces: dict[int, torch.Tensor] = {}
        if unseeded:
            logits = self.noisy_logits(images[unseeded], [samples[i] for i in unseeded])
            pieces.update(zip(unseeded, logits.split([samples[i] for i in unseeded]), strict=True))
        out = []
        with torch.inference_mode():
            for chunk in plan_chunks([samples[i] for i in seeded], self.chunk_rows):
                rows = torch.cat([images[seeded[j] : seeded[j] + 1].expand(stop - start, -1, -1, -1)
                                  for j, start, stop in chunk])
                source = SeededNoise.for_copies(
                    [int(seeds[seeded[j]]) for j, _, _ in chunk],  # type: ignore[arg-type]
                    [(start, stop) for _, start, stop in chunk], rows.device)
                out.append(self._forward_rows(rows, source))
        if seeded:
            logits = torch.cat(out)
            pieces.update(zip(seeded, logits.split([samples[i] for i in seeded]), strict=True))
        return torch.cat([pieces[i] for i in range(len(samples))])

    # --- serving: several images, each with its own m ------------------------------------------

    def predict_batch(self, images: torch.Tensor, samples: int | Sequence[int] | None = None,
                      aggregation: Aggregation | None = None,
                      seeds: Sequence[int | None] | None = None) -> list[Prediction]:
        """The smoothed answer for each image in ``images`` (``[B, 3, H, W]`` in [0, 1])."""
        counts = self._sample_counts(images.shape[0], samples)
        logits = self.noisy_logits(images, counts, seeds)
        return self.aggregate_logits(logits, counts, aggregation or self.smoothing.aggregation)

    def aggregate_logits(self, logits: torch.Tensor, counts: Sequence[int],
                         aggregation: Aggregation) -> list[Prediction]:
        """Turn the per-copy logits of :meth:`noisy_logits` into one answer per image."""
        return summarize(logits, counts, aggregation)

    def _sample_counts(self, num_images: int, samples: int | Sequence[int] | None) -> list[int]:
        if samples is None:
            samples = self.smoothing.default_samples
        counts = [samples] * num_images if isinstance(samples, int) else [int(m) for m in samples]
        if len(counts) != num_images or any(m < 1 for m in counts):
            raise ValueError("need one sample count >= 1 per image")
        return counts

    def predict_sequential(self, images: torch.Tensor, budget: int, confidence: float,
                           aggregation: Aggregation | None = None,
                           seed: int | None = None) -> list[tuple[Prediction, bool]]:
        """Sequential sampling (``models/sequential.py``): each image draws copies in rounds until its vote is
        decided at ``confidence`` or ``budget`` copies are used. Returns each image's answer (``samples`` =
        copies used) and whether it was decided. All undecided images of a round share one forward."""
        rule = aggregation or self.smoothing.aggregation
        votes = [SequentialVote(budget, confidence, self.num_classes, rule) for _ in range(images.shape[0])]
        while active := [i for i, v in enumerate(votes) if v.next_round()]:
            sizes = [votes[i].next_round() for i in active]
            seeds = None if seed is None else [round_seed(seed + i, votes[i].round_index) for i in active]
            logits = self.noisy_logits(images[active], sizes, seeds)
            for i, part in zip(active, logits.split(sizes), strict=True):
                votes[i].add(part)
        return [(summarize(v.all_logits(), [v.used], rule)[0], v.decided) for v in votes]

    # --- Cohen et al.: abstaining prediction and certification -------------------------------------

    def class_counts(self, x: torch.Tensor, n: int, seed: int | None = None) -> torch.Tensor:
        """How many of ``n`` noisy copies of the single image ``x`` the base model puts in each class."""
        logits = self.noisy_logits(x.unsqueeze(0), [n], None if seed is None else [seed])
        return torch.bincount(logits.argmax(1), minlength=self.num_classes).cpu()

    def predict(self, x: torch.Tensor, n: int, alpha: float, seed: int | None = None) -> int:
        """Cohen's PREDICT: the top class, or ``ABSTAIN`` if it does not beat the runner-up at level alpha."""
        counts = self.class_counts(x, n, seed)
        top2 = counts.topk(2)
        n_a, n_b = int(top2.values[0]), int(top2.values[1])
        if sign_test_p(n_a, n_a + n_b) > alpha:
            return ABSTAIN
        return int(top2.indices[0])

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, seed: int | None = None) -> Certificate:
        """Cohen's CERTIFY: pick the class on n0 copies, bound its probability on n fresh copies.

        The radius is ``sigma * Phi^-1(p_lower)`` in the space sigma is measured in
        (``smoothing.space``); with probability >= 1 - alpha the smoothed vote classifier is constant
        within it.
        """
        selection = self.class_counts(x, n0, seed)
        counts = self.class_counts(x, n, None if seed is None else seed + 1)
        return certify_from_counts(selection, counts, alpha, self.sigma)
