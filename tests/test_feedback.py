"""Signed prediction ids: what an id carries, what makes one unknown, and feedback counted once per id."""

from __future__ import annotations

import asyncio
import base64
import multiprocessing
import queue
import random
import time
from pathlib import Path

import pytest
from service_helpers import locked_feedback_file

from service.feedback import ID_BYTES, FeedbackStore, FeedbackUnavailableError, PredictionIds, TakenInFile

SECRET = "a secret of at least sixteen characters"


def test_an_id_carries_its_answer_and_reads_back_in_another_process_with_the_secret() -> None:
    issued_at = 1_800_000_000.25
    prediction_id = PredictionIds(SECRET, "tiny", 60.0).issue(7, 256, now=issued_at)
    again = PredictionIds(SECRET, "tiny", 60.0)  # another process, or one restarted: same secret, same model
    issued = again.read(prediction_id, now=issued_at + 59.0)
    assert issued is not None and (issued.label, issued.samples, issued.model, issued.at) == (7, 256, "tiny", issued_at)
    assert len(base64.urlsafe_b64decode(prediction_id + "=")) == ID_BYTES and "=" not in prediction_id
    assert again.read(prediction_id, now=issued_at + 60.0) is not None  # the TTL's last moment
    assert again.read(prediction_id, now=issued_at + 60.5) is None  # past the TTL
    assert again.read(prediction_id, now=issued_at - 5.0) is None  # from the future: not one this service issued
    many = [again.issue(k % 10, 256, now=issued_at) for k in range(1000)]
    assert len(set(many)) == 1000  # the same answer at the same moment: still a thousand ids
    assert all(again.read(i, now=issued_at) is not None for i in many)  # every letter an id may end in


def test_an_id_of_another_model_or_secret_altered_or_malformed_is_unknown() -> None:
    ids = PredictionIds(SECRET, "tiny", 60.0)
    prediction_id = ids.issue(3, 16)
    assert PredictionIds(SECRET, "tiny-v2", 60.0).read(prediction_id) is None
    assert PredictionIds("another secret, long enough", "tiny", 60.0).read(prediction_id) is None
    raw = bytearray(base64.urlsafe_b64decode(prediction_id + "="))
    for position in (0, 8, 9, 13, ID_BYTES - 1):  # the nonce, the label, the samples, the time, the tag
        altered = raw.copy()
        altered[position] ^= 0x01
        assert ids.read(base64.urlsafe_b64encode(bytes(altered)).decode().rstrip("=")) is None, position
    for junk in ("", "nope", prediction_id[:-1], prediction_id + "AAAA", prediction_id[:20] + "!" + prediction_id[21:],
                 prediction_id[:20] + "!!" + prediction_id[20:], prediction_id[:20] + "  " + prediction_id[20:],
                 prediction_id[:-2] + "é", "6ecc" * 8):
        assert ids.read(junk) is None, junk


def test_feedback_counts_once_per_id_however_it_is_spelt() -> None:
    store = FeedbackStore(PredictionIds(SECRET, "tiny", 60.0), capacity=10)
    first, second = store.ids.issue(1, 4), store.ids.issue(2, 4)
    assert store.take(first) is not None and store.take(first) is None
    # base64 leaves the last character's low bits unused: another spelling of the same bytes
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(second[-1])
    twin = second[:-1] + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last ^ 0b11]
    assert twin != second and store.ids.read(twin) == store.ids.read(second)
    assert store.take(twin) is not None and store.take(second) is None
    assert len(store) == 2


def test_the_memory_of_taken_ids_is_bounded_and_drops_expired_ones_first() -> None:
    ids = PredictionIds(SECRET, "tiny", 60.0)
    store = FeedbackStore(ids, capacity=3)
    old = [ids.issue(k, 4, now=1000.0) for k in range(3)]
    assert all(store.take(i, now=1001.0) is not None for i in old) and len(store) == 3
    newer = ids.issue(5, 4, now=1001.0)
    assert store.take(newer, now=1002.0) is not None and len(store) == 3  # the oldest forgotten: capacity
    assert store.take(old[1], now=1002.0) is None  # remembered still
    late = ids.issue(6, 4, now=1059.0)
    assert store.take(late, now=1061.0) is not None  # old[1], old[2] expired at 1060: forgotten, not counted
    assert len(store) == 2
    assert store.take(old[2], now=1061.0) is None  # and they stay unknown: expired


def test_the_id_format_is_pinned_so_replicas_of_two_versions_read_each_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """During a rolling upgrade old and new replicas share the secret: an id the old one issued must read the
    same in the new one. A change of the layout, the key derivation or the tag length shows here first."""
    monkeypatch.setattr("service.feedback.secrets.token_bytes", lambda n: bytes(range(n)))
    pinned = "AAECAwQFBgcAAwAAABBB2tJ0gCAAADWksiIGKE0oi7A"
    assert PredictionIds(SECRET, "tiny", 60.0).issue(3, 16, now=1_800_000_000.5) == pinned
    issued = PredictionIds(SECRET, "tiny", 60.0).read(pinned, now=1_800_000_001.0)
    assert issued is not None and (issued.label, issued.samples, issued.nonce) == (3, 16, bytes(range(8)))


def test_a_worker_recalls_through_the_same_once_only_memory() -> None:
    store = FeedbackStore(PredictionIds(SECRET, "tiny", 60.0), capacity=10)
    prediction_id = store.ids.issue(4, 64)
    issued = asyncio.run(store.recall(prediction_id))
    assert issued is not None and (issued.label, issued.samples) == (4, 64)
    assert asyncio.run(store.recall(prediction_id)) is None and store.take(prediction_id) is None


def take_all(path: Path, prediction_ids: list[str], seed: int, start: multiprocessing.synchronize.Barrier,
             taken: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """One process of the race below: take every id, in its own order, once all have opened the file, and
    report the ones it got."""
    store = FeedbackStore(PredictionIds(SECRET, "tiny", 600.0), capacity=1, path=path)
    order = prediction_ids.copy()
    random.Random(seed).shuffle(order)
    start.wait(60)
    taken.put([i for i in order if store.take(i) is not None])
    store.close()


def test_a_feedback_file_counts_each_id_once_across_processes_and_restarts(tmp_path: Path) -> None:
    """SIAM_FEEDBACK_DB: processes (or replicas on one host) racing on the same ids take each exactly once
    between them, and a store opened again on the file, as after a restart, refuses them all. The memory
    capacity does not apply to the file: a capacity of 1 forgets nothing there."""
    path = tmp_path / "state" / "siam" / "feedback.sqlite"  # the folders are made
    ids = PredictionIds(SECRET, "tiny", 600.0)
    issued = [ids.issue(k % 10, 16) for k in range(300)]
    FeedbackStore(ids, capacity=1, path=path).close()  # the first process to start makes the file
    context = multiprocessing.get_context("spawn")
    start, taken = context.Barrier(3), context.Queue()
    racers = [context.Process(target=take_all, args=(path, issued, seed, start, taken)) for seed in range(3)]
    got: list[list[str]] = []
    try:
        for racer in racers:
            racer.start()
        deadline = time.monotonic() + 120
        while len(got) < len(racers):
            try:
                got.append(taken.get(timeout=0.5))
            except queue.Empty:  # a racer that died fails the test now, not at the deadline
                assert all(r.exitcode in (None, 0) for r in racers), [r.exitcode for r in racers]
                assert time.monotonic() < deadline
        for racer in racers:
            racer.join(30)
            assert racer.exitcode == 0
    finally:
        for racer in racers:
            if racer.is_alive():
                racer.kill()
    assert sorted(i for share in got for i in share) == sorted(issued)  # each id once, across the three
    restarted = FeedbackStore(ids, capacity=1, path=path)
    assert len(restarted) == 300 and all(restarted.take(i) is None for i in issued)
    fresh = ids.issue(2, 16)
    issued_fresh = restarted.take(fresh)
    assert issued_fresh is not None and issued_fresh.label == 2 and restarted.take(fresh) is None
    restarted.close()
    in_memory = FeedbackStore(ids, capacity=1)  # without the file: this process's own memory, which knew none
    assert in_memory.take(issued[0]) is not None


def test_the_feedback_file_keeps_ids_until_they_expire_and_models_apart(tmp_path: Path) -> None:
    path = tmp_path / "feedback.sqlite"
    ids = PredictionIds(SECRET, "tiny", 60.0)
    store = FeedbackStore(ids, capacity=10, path=path)
    old = [ids.issue(k, 4, now=1000.0) for k in range(3)]
    assert all(store.take(i, now=1001.0) is not None for i in old) and len(store) == 3
    # another model's store on the same file: its own rows, even for the same nonce
    other = TakenInFile(path, "tiny-v2")
    nonce = ids.read(old[0], now=1001.0).nonce  # type: ignore[union-attr]
    assert other.first(nonce, 1060.0, now=1001.0) and not other.first(nonce, 1060.0, now=1001.0)
    assert len(other) == 1 and len(store) == 3
    # rows are dropped once their id has expired (1060), at the next pruning, PRUNE_EVERY_S after the last
    # (at the first take, 1001); a valid id is never dropped
    late = ids.issue(7, 4, now=1030.0)
    assert store.take(late, now=1059.0) is not None and len(store) == 4  # nothing expired yet
    later = ids.issue(8, 4, now=1030.0)
    assert store.take(later, now=1001.0 + TakenInFile.PRUNE_EVERY_S) is not None
    assert len(store) == 2 and store.take(late, now=1062.0) is None
    other.close()
    store.close()


def test_a_locked_or_unusable_feedback_file_fails_loudly_and_counts_nothing(tmp_path: Path) -> None:
    """A file another process holds locked past the busy timeout: FeedbackUnavailableError (the service
    answers 503), and the feedback was not counted, so the client's retry is taken. A path that cannot be a
    SQLite file fails at start, naming the setting."""
    path = tmp_path / "feedback.sqlite"
    ids = PredictionIds(SECRET, "tiny", 60.0)
    store = FeedbackStore(ids, capacity=10, path=path)
    prediction_id = ids.issue(5, 16)
    with locked_feedback_file(store, path, busy_timeout_s=0.2):
        started = time.monotonic()
        with pytest.raises(FeedbackUnavailableError, match="could not be written"):
            store.take(prediction_id)
        assert 0.15 < time.monotonic() - started < 3.0  # it waited for the lock, as long as it was told
        with pytest.raises(FeedbackUnavailableError):
            asyncio.run(store.recall(prediction_id))
    issued = asyncio.run(store.recall(prediction_id))  # the retry counts, once
    assert issued is not None and issued.label == 5 and store.take(prediction_id) is None
    store.close()
    (tmp_path / "a folder").mkdir()
    (tmp_path / "a file").write_text("not a folder")
    for unusable in (tmp_path / "a folder", tmp_path / "a file" / "feedback.sqlite", tmp_path / "a file"):
        with pytest.raises(OSError, match="as the feedback file \\(SIAM_FEEDBACK_DB\\)"):
            FeedbackStore(ids, capacity=10, path=unusable)
