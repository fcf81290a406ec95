"""The batching engine: every waiting request's noisy copies go through the model together.

Requests join one queue. When the worker is idle, the dispatch (callbacks on the event loop) takes all
that are waiting, up to ``max_batch_rows`` noisy rows, and hands them to a single worker thread, which
expands each image into its ``samples`` copies, runs them through the backend in chunks, and aggregates
per image. Requests with different ``samples``, aggregation rules or certify flags share a batch. The
event loop never runs the model: while the worker computes, new requests gather for the next batch, which
the worker takes itself, so that the model does not wait for an event loop busy with HTTP work to hand it
over. A lock guards the queue, which both take from. With a backend that queues its calls (ONNX Runtime's
pool of one-thread calls), the worker keeps two calls in flight: it queues the next call (of this batch,
or of the next when the requests waiting give every model thread a chunk) before the running one ends,
and answers a batch while the model computes the next.

Admission is deadline-aware, as Triton's queue policy is: a request that cannot be answered before its
deadline given the rows queued ahead of it (at the measured cost per row) is refused at once with
:class:`OverloadedError` (503), so under overload the service spends its time on answers that arrive in
time. A full queue raises :class:`QueueFullError` (503). A request past its deadline raises
:class:`DeadlineExceededError` (504); the worker runs a batch in calls of about :func:`rows_per_call` rows
and, as it queues each call, drops the images of requests that expired, were abandoned by their client, or
were shed by a shutdown, so no work is done for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from models.smooth import ABSTAIN, Certificate, Prediction, certify_from_counts, summarize
from models.spec import Aggregation
from service.backends import Backend, Done, Pending
from service.metrics import Metrics, samples_bucket

log = logging.getLogger("siam.engine")


class QueueFullError(RuntimeError):
    """The queue holds ``max_queue`` requests already."""


class DeadlineExceededError(TimeoutError):
    """The request waited longer than its deadline."""


class ShuttingDownError(RuntimeError):
    """The engine no longer takes requests."""


SHED_MESSAGE = "the server is shutting down; this request was not finished within the grace period"


class OverloadedError(RuntimeError):
    """The rows queued ahead would not be computed before this request's deadline."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Answer:
    """One image's answer: the smoothed prediction and, with certify, Cohen's certificate."""

    prediction: Prediction
    certificate: Certificate | None = None
    decided: bool | None = None  # sequential sampling only: the vote was settled before the budget ran out

    @property
    def label(self) -> int:
        """The class answered: the certificate's when certifying (the engine makes it agree with the
        prediction or abstain), else the prediction's."""
        return self.prediction.label if self.certificate is None else self.certificate.label


@dataclass(eq=False)  # identity, not field equality: jobs are found in the queue by identity
class Job:
    """One request: its images and how to answer them."""

    images: torch.Tensor  # [B, 3, H, W] float32 in [0, 1], on the CPU
    samples: int
    aggregation: Aggregation
    seed: int | None
    certify_alpha: float | None  # None: no certificate
    selection_samples: int
    deadline: float  # time.monotonic() after which the answer is useless
    future: asyncio.Future[list[Answer] | list[torch.Tensor]]
    enqueued: float = field(default_factory=time.perf_counter)
    internal: bool = False  # the service's own traffic (the canary): not counted as answered predictions
    raw: bool = False  # answer each image's per-copy logits, not an aggregate (a round of sequential sampling)
    taken: bool = False  # out of the queue: handed to the worker, or dropped by it
    abandoned: bool = False  # answered already (expired, shed) or its client went away: compute no more of it
    estimate_s: float | None = None  # admission's estimate of the seconds to its answer, if it made one

    def alive(self) -> bool:
        """Still worth computing; read by the worker thread (plain attribute reads, no loop state)."""
        return not self.abandoned and time.monotonic() <= self.deadline

    @property
    def copies(self) -> int:
        """Noisy copies per image: ``samples``, plus Cohen's selection copies when certifying."""
        return self.samples + (self.selection_samples if self.certify_alpha is not None else 0)

    @property
    def rows(self) -> int:
        return self.images.shape[0] * self.copies


def rows_per_call(backend: Backend) -> int:
    """Rows the worker hands the backend per call, checking between calls for requests no longer alive:
    the backend's ``group_rows`` where it has one (a pool of one-thread calls wants several chunks per
    thread), else a chunk."""
    return max(1, int(getattr(backend, "group_rows", backend.chunk_rows)))


def images_of(batch: list[Job], group: list[tuple[int, int]]) -> torch.Tensor:
    """The images of ``group`` (``(job, image)`` pairs; a job's images consecutive and in order, since a job
    that is no longer alive stays so) as one tensor, in one torch call: a whole job's tensor as it is, part of
    one as a slice. Not a call per image: on the model thread every torch call releases the GIL, which under
    load the event loop may then hold for up to a switch interval."""
    pieces: list[torch.Tensor] = []
    for j, units in itertools.groupby(group, key=lambda unit: unit[0]):
        images = batch[j].images
        indices = [i for _, i in units]
        first, last = indices[0], indices[-1]
        pieces.append(images if last - first + 1 == images.shape[0] else images[first : last + 1])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# Backend calls queued at once on a backend that queues them (``submit``): one running, the next waiting
# behind it, so the model thread answers one batch and takes the next while the model computes.
CALLS_IN_FLIGHT = 2


@dataclass(eq=False)
class Flight:
    """A batch on the model thread: its calls, queued in order, and the logits collected so far."""

    batch: list[Job]
    pos: int = 0  # the next image (of ``units``) to queue
    calls: int = 0  # queued and not collected yet
    formed: bool = False  # every call is queued
    completed: bool = False  # answered (posted to the loop)
    error: Exception | None = None
    compute_s: float = 0.0
    computed: int = 0  # rows
    images: int = 0
    units: list[tuple[int, int]] = field(init=False)  # (job, image), in order
    parts: list[list[torch.Tensor]] = field(init=False)  # each job's logits, call by call

    def __post_init__(self) -> None:
        self.units = [(j, i) for j, job in enumerate(self.batch) for i in range(job.images.shape[0])]
        self.parts = [[] for _ in self.batch]

    def next_group(self, target: int) -> list[tuple[int, int]] | None:
        """The images of the next call, about ``target`` rows of the jobs still alive (checked now, so no
        work is queued for a request that expired or was abandoned); None when none are left or a call of
        this batch failed."""
        if self.error is not None:
            return None
        group: list[tuple[int, int]] = []
        rows = 0
        while self.pos < len(self.units) and rows < target:
            j, i = self.units[self.pos]
            self.pos += 1
            if self.batch[j].alive():
                group.append((j, i))
                rows += self.batch[j].copies
        return group or None


Queued = tuple[Flight, list[tuple[int, int]], Pending, float]  # a call: its batch, images, logits, when queued


def consistent(certificate: Certificate, label: int) -> Certificate:
    """A certificate for a class other than the answer's own (the selection copies picked one class, the
    aggregate of the estimation copies another: possible with softmax or logit aggregation) abstains,
    so that an answer never certifies a label its probabilities do not name."""
    if certificate.abstained or certificate.label == label:
        return certificate
    return Certificate(ABSTAIN, 0.0, certificate.p_lower, certificate.counts)


class Engine:
    """Dynamic batching over one backend; ``await engine.predict(...)`` from request handlers."""

    def __init__(self, backend: Backend, model_name: str, sigma: float, metrics: Metrics,
                 max_batch_rows: int, max_wait_ms: float, max_queue: int):
        """The limits come from :class:`service.settings.Settings` (one place for their defaults)."""
        self.backend = backend
        self.model_name = model_name
        self.sigma = sigma
        self.metrics = metrics
        self.max_batch_rows = max_batch_rows
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self._pending: deque[Job] = deque()
        # Guards the queue (_pending, _queued_rows, Job.taken) and the worker's state (_busy, _running, _busy_rows):
        # the loop queues and starts the worker when it is idle; the worker takes the next batch itself.
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        # The model's own thread, fed through a queue and answering through call_soon_threadsafe: one hand-off
        # each way, without an executor's futures chained into the loop's.
        self._work: queue.SimpleQueue[list[Job] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._timer: asyncio.TimerHandle | None = None  # a batch gathering for max_wait
        self._gathering_since = 0.0
        self._closing = False
        self._busy = False  # the worker is computing a batch
        self._queued_rows = 0  # rows of the jobs in _pending
        # (deadline, arrival order, job) of the jobs in _pending and of some that left it (Job.taken): admission
        # reads the earliest of those still waiting. Touched on the event loop only.
        self._deadlines: list[tuple[float, int, Job]] = []
        self._order = itertools.count()
        self._error_mean_s = 0.0  # moving averages of (answered - estimated) seconds: see estimate_margin_s
        self._error_spread_s = 0.0
        self._busy_rows = 0  # rows of the batch being computed
        self._busy_since = 0.0
        self._running: list[Job] = []
        # Seconds per noisy row, measured on batches of at least a chunk (None until the first such batch
        # or a start-up measurement): prices the queue for deadline-aware admission.
        self.row_cost_s: float | None = None
        self._last_collected = 0.0  # when the model thread last collected a call's logits
        self._answered: list[tuple[list[Job], list[Any], Exception | None]] = []  # batches to post to the loop

    # --- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = threading.Thread(target=self._work_loop, name="siam-model", daemon=True)
        self._worker.start()

    async def stop(self) -> None:
        """Refuse new work, finish what was accepted, then stop the worker."""
        self._closing = True
        while self._pending or self._busy:
            await asyncio.sleep(0.01)
        if self._timer is not None:
            self._timer.cancel()
        if self._worker is not None:
            self._work.put(None)
            await asyncio.to_thread(self._worker.join)

    def shed(self) -> int:
        """Answer every accepted request not finished yet with :class:`ShuttingDownError` (503) and stop
        computing them: called when the shutdown grace period is about to run out, so that no request is
        cut off with a 500 or a reset. Returns how many were shed."""
        self._closing = True
        with self._lock:
            jobs = [*self._pending, *self._running]
            for job in jobs:
                job.abandoned = job.taken = True
            self._pending.clear()
            self._queued_rows = 0
        shed = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(ShuttingDownError(SHED_MESSAGE))
                shed += 1
        self.metrics.queue_length.set(0)
        return shed

    def estimated_wait_s(self, extra_rows: int = 0) -> float | None:
        """Seconds until ``extra_rows`` more rows would be computed behind the current backlog."""
        if self.row_cost_s is None:
            return None
        running_left = 0.0
        if self._busy:
            running_left = max(0.0, self._busy_rows * self.row_cost_s - (time.perf_counter() - self._busy_since))
        return running_left + (self._queued_rows + extra_rows) * self.row_cost_s

    def _admit(self, job: Job, timeout: float) -> None:
        """Deadline-aware admission: raise :class:`OverloadedError` (503 at once) for a request that the work
        ahead of it would make late, or that would make the requests waiting before it late. A refusal costs
        the client a retry; an admitted request answered late costs that and the model's time too."""
        estimate = self.estimated_wait_s(job.rows)
        if estimate is None:
            return
        job.estimate_s = estimate
        wait = estimate + self.estimate_margin_s
        if wait > timeout:
            raise OverloadedError(f"the {self._queued_rows + self._busy_rows} noisy rows ahead of this request "
                                  f"would take about {wait:.2f} s, past its {timeout:g} s deadline",
                                  max(1, math.ceil(wait - timeout)))
        # The requests waiting join the next batch with this one and are answered with it, when the batch ends:
        # admitted, its rows would delay theirs. Without this check (and the margin) a 2x overload on 2 cores
        # answered 504 a third to two thirds as many requests as it answered in time, each computed for nothing.
        left = self._earliest_waiting_deadline() - job.deadline + timeout
        if wait > left:
            raise OverloadedError(f"this request's {job.rows} noisy rows would delay the requests waiting "
                                  f"before it past their deadline (about {wait:.2f} s of work, "
                                  f"{max(left, 0.0):.2f} s left to the first of them)",
                                  max(1, math.ceil(wait - left)))

    @property
    def estimate_margin_s(self) -> float:
        """Seconds added to every admission estimate: how far the estimates of the requests admitted lately
        ran over (mean plus twice the mean deviation, never below 0). On 2 cores, estimates of about 0.2 s
        were off by -0.04 to +0.05 s (46 requests under a 2x overload): on its estimate alone, a request with
        a 0.3 s deadline estimated at 0.28 s was admitted and answered late."""
        return max(0.0, self._error_mean_s + 2 * self._error_spread_s)

    def _learn_estimate_error(self, error_s: float) -> None:
        """Fold one answered request's (actual - estimated) seconds into the margin (moving averages, as TCP
        does for its retransmission timeout)."""
        self._error_spread_s = 0.9 * self._error_spread_s + 0.1 * abs(error_s - self._error_mean_s)
        self._error_mean_s = 0.9 * self._error_mean_s + 0.1 * error_s
        self.metrics.admission_margin.set(self.estimate_margin_s)

    def _earliest_waiting_deadline(self) -> float:
        """The earliest deadline among the requests still waiting (``inf`` with none), from a heap that drops
        the requests that left the queue as it meets them. Called on the event loop only."""
        while self._deadlines and self._deadlines[0][2].taken:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else math.inf

    @property
    def queue_length(self) -> int:
        return len(self._pending)

    # --- the request side ------------------------------------------------------------------------

    async def predict(self, images: torch.Tensor, samples: int, aggregation: Aggregation,
                      seed: int | None = None, certify_alpha: float | None = None,
                      selection_samples: int = 64, timeout: float = 30.0, internal: bool = False) -> list[Answer]:
        """Queue ``images`` and wait for their answers. ``internal`` (the canary) keeps the answers out of
        the prediction, vote-share and abstention metrics, which describe client traffic.

        Raises QueueFullError, OverloadedError, DeadlineExceededError or ShuttingDownError.
        """
        return await self._submit(images, samples, aggregation, seed, certify_alpha, selection_samples, timeout,
                                  internal)  # type: ignore[return-value]

    async def copy_logits(self, images: torch.Tensor, copies: int, seed: int | None, timeout: float,
                          admit: bool = True) -> list[torch.Tensor]:
        """Each image's ``[copies, C]`` logits (one round of sequential sampling), batched like any request.
        ``admit=False`` skips deadline-aware admission: a later round of a request already admitted."""
        return await self._submit(images, copies, "vote", seed, None, 0, timeout, True, raw=True,
                                  admit=admit)  # type: ignore[return-value]

    async def _submit(self, images: torch.Tensor, samples: int, aggregation: Aggregation, seed: int | None,
                      certify_alpha: float | None, selection_samples: int, timeout: float, internal: bool,
                      raw: bool = False, admit: bool = True) -> list[Answer] | list[torch.Tensor]:
        if self._closing or self._loop is None:
            raise ShuttingDownError("the server is shutting down")
        if len(self._pending) >= self.max_queue:
            raise QueueFullError(f"{len(self._pending)} requests are waiting (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        if timeout <= 0:
            raise DeadlineExceededError("no time left before the deadline")
        job = Job(images, samples, aggregation, seed, certify_alpha, selection_samples,
                  time.monotonic() + timeout, loop.create_future(), internal=internal, raw=raw)
        if admit and (self._pending or self._busy):  # alone on an idle worker a request always gets its chance
            self._admit(job, timeout)
        with self._lock:
            self._pending.append(job)
            self._queued_rows += job.rows
        self._earliest_waiting_deadline()  # drops what left the queue, so the heap holds no finished request
        heapq.heappush(self._deadlines, (job.deadline, next(self._order), job))
        self.metrics.queue_length.set(len(self._pending))
        # At the end of this loop iteration, so the requests that arrived in the same tick share a batch.
        loop.call_soon(self._kick)
        # A timer rather than asyncio.wait_for: it fails the future itself at the deadline (the worker then
        # skips the job) and costs no extra task per request.
        expiry = loop.call_later(timeout, self._expire, job, timeout)
        try:
            return await job.future  # cancelled when the client goes away (see service/api.py)
        finally:
            expiry.cancel()
            job.abandoned = True  # answered, late or cancelled: the worker computes no more of it
            if not job.taken:  # late or abandoned while queued: free its place in the queue now
                with self._lock:
                    if not job.taken:  # (the worker may have taken it meanwhile)
                        job.taken = True
                        self._pending.remove(job)
                        self._queued_rows -= job.rows
                self.metrics.queue_length.set(len(self._pending))

    @staticmethod
    def _expire(job: Job, timeout: float) -> None:
        job.abandoned = True
        if not job.future.done():
            job.future.set_exception(DeadlineExceededError(f"no answer within {timeout:g} s"))

    # --- the worker side -------------------------------------------------------------------------

    # Dispatch to an idle worker runs in callbacks on the event loop, not in a task of its own: a request that
    # finds the worker idle starts its batch at the end of the loop iteration it arrived in (with every request
    # of that iteration). A worker that finishes a batch takes the next itself (_work_loop).

    def _kick(self) -> None:
        """Start a batch if the worker is idle and work waits; with ``max_wait``, first let a burst gather."""
        if self._busy or self._timer is not None or not self._pending:
            return
        self._gathering_since = time.perf_counter()
        if self.max_wait > 0 and self._queued_rows < self.max_batch_rows:
            assert self._loop is not None
            self._timer = self._loop.call_later(self.max_wait, self._launch)
            return
        self._launch()

    def _launch(self) -> None:
        """Hand every waiting request (up to ``max_batch_rows`` rows) to the idle worker thread."""
        assert self._loop is not None
        self._timer = None
        with self._lock:
            if self._busy:  # the worker took the waiting requests itself meanwhile
                return
            batch, dropped = self._take_batch()
            self._start(batch)
        self._fail_dropped(dropped)
        self.metrics.queue_length.set(len(self._pending))
        self.metrics.batch_formation.observe(time.perf_counter() - self._gathering_since)
        if batch:
            self._work.put(batch)

    def _start(self, batch: list[Job]) -> None:
        """``batch`` joins the work in flight; none: the worker goes idle (nothing is in flight then). Called
        with the lock held."""
        if not batch:
            self._busy, self._running, self._busy_rows = False, [], 0
            return
        if not self._busy:
            self._busy, self._busy_since = True, time.perf_counter()
        self._running.extend(batch)
        self._busy_rows += sum(job.rows for job in batch)

    def _work_loop(self) -> None:
        """The model's thread: run each batch's calls, post its answers (or the error) back to the loop, and
        take the requests that gathered meanwhile as the next batch, until none wait; then wait to be handed
        one. With a backend that queues calls (:meth:`service.backends.OnnxBackend.submit`), up to
        ``CALLS_IN_FLIGHT`` are queued at once: the next call of a batch, or, when the requests waiting give
        every model thread a chunk, the next batch's first call, is queued while the one before runs, so the
        model does not wait while a batch is answered."""
        assert self._loop is not None
        depth = CALLS_IN_FLIGHT if hasattr(self.backend, "submit") else 1
        while (batch := self._work.get()) is not None:
            queued: deque[Queued] = deque()  # oldest first
            forming: Flight | None = self._flight(batch)  # the batch whose calls are being queued
            while forming is not None or queued:
                if forming is not None and len(queued) < depth:
                    group = forming.next_group(rows_per_call(self.backend))
                    if group is not None:
                        queued_at = time.perf_counter()  # (before: a backend that only computes does so here)
                        queued.append((forming, group, self._queue_call(forming, group), queued_at))
                        forming.calls += 1
                        continue
                    forming.formed = True  # every call of it is queued
                    if forming.calls == 0 or queued[-1][2].done():  # nothing to overlap: answer it first
                        while queued:
                            self._collect_next(queued)
                        if not forming.completed:  # (one without calls: every image was dropped)
                            self._complete(forming)
                        forming = self._next_flight(idle=True)
                    elif self._queued_rows >= self.backend.chunk_rows * getattr(self.backend, "workers", 1):
                        # Enough waits to give every model thread a chunk: queue it behind the running call.
                        # (Fewer rows, queued early, measured slower: a smaller next batch costs more per row
                        # than the model's idle time it saves.)
                        forming = self._next_flight(idle=False)
                    else:
                        forming = None
                else:
                    self._collect_next(queued)
                    if forming is None:
                        forming = self._next_flight(idle=not queued)
                # Answers are posted after the next batch is taken: requests sent once an answer arrived find
                # the worker busy or idle, never about to take them, and gather (max_wait) as for an idle one.
                for args in self._answered:
                    self._post(self._finish, *args)
                self._answered.clear()

    def _flight(self, batch: list[Job]) -> Flight:
        start = time.perf_counter()
        for job in batch:
            self.metrics.queue_wait.observe(start - job.enqueued)
        return Flight(batch)

    def _next_flight(self, idle: bool) -> Flight | None:
        """Take the requests waiting as the next batch (failing those dropped on the loop); with none waiting
        and ``idle``, mark the worker idle, atomically with finding the queue empty."""
        with self._lock:
            batch, dropped = self._take_batch()
            if batch or idle:
                self._start(batch)
        if batch:  # no gathering: the requests waited while the last batch ran
            self.metrics.batch_formation.observe(0.0)
        self.metrics.queue_length.set(len(self._pending))
        if dropped:
            self._post(self._fail_dropped, dropped)
        return self._flight(batch) if batch else None

    def _queue_call(self, flight: Flight, group: list[tuple[int, int]]) -> Pending:
        """Queue one backend call on ``group`` (or compute it here, with a backend that only computes)."""
        batch = flight.batch
        args = (images_of(batch, group), [batch[j].copies for j, _ in group], [batch[j].seed for j, _ in group])
        try:
            submit = getattr(self.backend, "submit", None)
            return submit(*args) if submit is not None else Done(self.backend.logits(*args))
        except Exception as e:  # answered to every request of the batch by _finish
            return Done(error=e)

    def _collect_next(self, queued: deque[Queued]) -> None:
        """Wait for the oldest queued call and keep each image's logits (a failed call fails its batch);
        answer its batch if that was the batch's last call."""
        flight, group, pending, queued_at = queued.popleft()
        flight.calls -= 1
        try:
            logits = pending.result()
        except Exception as e:
            flight.error = flight.error or e
        else:
            batch = flight.batch
            for (j, _), part in zip(group, logits.split([batch[j].copies for j, _ in group]), strict=True):
                flight.parts[j].append(part)
            now = time.perf_counter()
            # The call ran from when it was queued or when the call before it was collected, whichever is later.
            flight.compute_s += now - max(queued_at, self._last_collected)
            self._last_collected = now
            flight.computed += logits.shape[0]
            flight.images += len(group)
        if flight.formed and flight.calls == 0:
            self._complete(flight)

    def _complete(self, flight: Flight) -> None:
        """Answer a batch whose calls are all collected: post its answers (or the error) to the loop."""
        flight.completed = True
        answers: list[list[Answer] | list[torch.Tensor] | None] = []
        error = flight.error
        if error is None:
            start = time.perf_counter()
            try:
                answers = self._answers(flight.batch, flight.parts)
                flight.compute_s += time.perf_counter() - start  # (aggregation is part of the model's time)
                self._account(flight)
            except Exception as e:
                error = e
        with self._lock:
            del self._running[: len(flight.batch)]  # batches finish in the order they were taken
            self._busy_rows -= sum(job.rows for job in flight.batch)
            self._busy_since = time.perf_counter()
        self._answered.append((flight.batch, answers, error))

    def _account(self, flight: Flight) -> None:
        """The batch's metrics, and the cost per row that prices the queue."""
        # Priced on a chunk or more, not a call (a pooled backend's calls are larger than most batches): smaller
        # batches are dominated by fixed costs and would overprice a row.
        if flight.computed >= self.backend.chunk_rows:
            cost = flight.compute_s / flight.computed
            self.row_cost_s = cost if self.row_cost_s is None else 0.8 * self.row_cost_s + 0.2 * cost
        self.metrics.model_compute.observe(flight.compute_s)
        self.metrics.batch_images.observe(flight.images)
        self.metrics.batch_rows.observe(flight.computed)
        self.metrics.rows.labels(self.model_name).inc(flight.computed)

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        """Run ``callback`` on the event loop (nobody waits if the loop was closed without stopping the engine)."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    def _fail_dropped(self, dropped: list[Job]) -> None:
        """On the loop: answer the requests :meth:`_take_batch` dropped because their deadline had passed."""
        for job in dropped:
            if not job.future.done():
                job.future.set_exception(DeadlineExceededError("deadline passed while queued"))

    def _finish(self, batch: list[Job], answers: list[list[Answer] | list[torch.Tensor] | None],
                error: Exception | None = None) -> None:
        """Answer every request of the batch (a model failure answers each with the error); if the worker went
        idle with requests waiting, start it again."""
        if error is not None:
            log.error("batch of %d requests failed", len(batch), exc_info=error)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
        else:
            now = time.perf_counter()
            for job, answer in zip(batch, answers, strict=True):
                if job.estimate_s is not None and answer is not None:  # (late ones too: they are the misses)
                    self._learn_estimate_error(now - job.enqueued - job.estimate_s)
                if job.future.done():
                    continue
                if answer is None:  # dropped by the worker: its deadline passed while the batch ran
                    job.future.set_exception(DeadlineExceededError("deadline passed while its batch ran"))
                else:
                    job.future.set_result(answer)
        self._kick()

    def _take_batch(self) -> tuple[list[Job], list[Job]]:
        """Waiting jobs, oldest first, up to ``max_batch_rows`` rows (always at least one job), and the jobs
        dropped here, uncomputed, because their deadline passed or their client left (the loop fails those:
        see :meth:`_fail_dropped`). Called with the lock held, from either thread."""
        batch: list[Job] = []
        dropped: list[Job] = []
        rows = 0
        while self._pending:
            job = self._pending[0]
            if job.future.done() or not job.alive():
                self._pending.popleft()
                self._queued_rows -= job.rows
                job.taken = job.abandoned = True
                dropped.append(job)
                continue
            if batch and rows + job.rows > self.max_batch_rows:
                break
            job.taken = True
            batch.append(self._pending.popleft())
            self._queued_rows -= job.rows
            rows += job.rows
        return batch, dropped

    def _answers(self, batch: list[Job],
                 parts: list[list[torch.Tensor]]) -> list[list[Answer] | list[torch.Tensor] | None]:
        """Every finished job's answer (None for one dropped part-way). Plain predictions with the same
        aggregation rule are summarized together, in one set of tensor operations for the whole batch:
        per job, those few small operations cost more than the job's share of the model on a GPU."""
        answers: list[list[Answer] | list[torch.Tensor] | None] = [None] * len(batch)
        plain: dict[Aggregation, list[int]] = {}
        for j, (job, p) in enumerate(zip(batch, parts, strict=True)):
            if len(p) != job.images.shape[0]:
                continue
            if job.raw or job.certify_alpha is not None:
                answers[j] = self._answer(job, torch.cat(p))
            else:
                plain.setdefault(job.aggregation, []).append(j)
        for rule, members in plain.items():
            jobs = [batch[j] for j in members]
            predictions = summarize(torch.cat([t for j in members for t in parts[j]]),
                                    [job.samples for job in jobs for _ in range(job.images.shape[0])], rule)
            by_samples: dict[int, list[Answer]] = {}
            pos = 0
            for j, job in zip(members, jobs, strict=True):
                n = job.images.shape[0]
                mine = [Answer(p) for p in predictions[pos : pos + n]]
                answers[j], pos = mine, pos + n
                if not job.internal:
                    by_samples.setdefault(job.samples, []).extend(mine)
            for samples, client_answers in by_samples.items():
                self.record(client_answers, samples)
        return answers

    def _answer(self, job: Job, logits: torch.Tensor) -> list[Answer] | list[torch.Tensor]:
        """One job's raw per-copy logits, or its certified answer: the first n0 copies of each image select
        the class and the other ``samples`` copies (independent draws) bound its probability. (Plain
        predictions are summarized batch-wide by :meth:`_answers`.)"""
        n = job.images.shape[0]
        per_image = logits.view(n, job.copies, -1)
        if job.raw:
            return list(per_image.unbind(0))
        assert job.certify_alpha is not None
        selection, estimation = per_image[:, : job.selection_samples], per_image[:, job.selection_samples :]
        predictions = summarize(estimation.reshape(-1, logits.shape[1]), [job.samples] * n, job.aggregation)
        classes = logits.shape[1]
        answers = [
            Answer(p, consistent(certify_from_counts(torch.bincount(sel.argmax(1), minlength=classes),
                                                     torch.bincount(est.argmax(1), minlength=classes),
                                                     job.certify_alpha, self.sigma), p.label))
            for sel, est, p in zip(selection, estimation, predictions, strict=True)
        ]
        if not job.internal:
            self.record(answers, job.samples)
        return answers

    def record(self, answers: list[Answer], samples: int) -> None:
        """Count answered client predictions (``samples``: the m asked for, or the budget)."""
        record_answers(self.metrics, self.model_name, answers, samples)


def record_answers(metrics: Metrics, model_name: str, answers: list[Answer], samples: int) -> None:
    """The prediction, vote-share, certification and sequential-sampling metrics of client answers."""
    metrics.predictions.labels(model_name, samples_bucket(samples)).inc(len(answers))
    for a in answers:
        metrics.vote_share.labels(model_name).observe(a.prediction.vote_share)
        if a.certificate is not None:
            metrics.certifications.labels(model_name).inc()
            if a.certificate.abstained:
                metrics.abstentions.labels(model_name).inc()
        if a.decided is not None:
            metrics.samples_used.labels(model_name, str(a.decided).lower()).observe(a.prediction.samples)
