"""`siam serve --workers N`: HTTP workers in front of one model process.

In-process: the model process's server (service/model_process.py) and a worker's RemoteEngine on one event
loop, against a local engine on the same checkpoint. Subprocess: the whole thing, answering, sharing
feedback and metrics between workers, draining on SIGTERM, and failing as a whole."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from models.checkpoint import read_manifest
from models.smooth import Prediction
from service import model_links
from service.app import start_worker
from service.backends import load_backend
from service.engine import Answer, DeadlineExceededError, Engine, OverloadedError, QueueFullError, ShuttingDownError
from service.feedback import FeedbackUnavailableError, PredictionIds
from service.metrics import Metrics
from service.model_links import ModelLinks
from service.model_process import serve_model
from service.remote_engine import FeedbackRouter, ModelLostError, RemoteEngine, connect, owner
from service.settings import Settings
from service.state import ServiceState, ServiceUnavailableError, serving
from service.wire import (
    ModelProcessError,
    decode_answers,
    decode_error,
    encode_answers,
    encode_error,
    frame,
    read_frame,
)
from service.workers import RestartBudget, Supervisor, listening_sockets
from tests.service_helpers import ROOT, Server, b64, image_bytes, locked_feedback_file
from tests.stand_in_children import hold

BODY = {"image": b64(image_bytes(0))}


def settings_for(checkpoint: Path, **overrides: object) -> Settings:
    fields: dict[str, object] = {"checkpoint": checkpoint, "backend": "torch", "chunk_rows": 64, "threads": 1,
                                 "warmup": False, "allow_seed": True, **overrides}
    return Settings(**fields)  # type: ignore[arg-type]


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


async def until(condition: object, timeout: float = 30.0) -> None:
    """Poll ``condition()`` until true, within a bound."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


class ModelProcessInLoop:
    """serve_model on this loop with a RemoteEngine connected to it; ``state`` is the model process's."""

    def __init__(self, settings: Settings, index: int = 0):
        self.settings, self.index = settings, index
        self.folder = tempfile.TemporaryDirectory(prefix="siam-test-")
        self.path = Path(self.folder.name, "model.sock")
        self.state = ServiceState(settings)
        self.control, self.model_end = multiprocessing.Pipe()

    async def __aenter__(self) -> RemoteEngine:
        self.task = asyncio.create_task(serve_model(self.settings, self.path, self.model_end, self.state, self.index))
        reader, writer, hello = await asyncio.wait_for(connect(self.path), 60)
        assert hello["ready"], hello
        assert hello["chunk_rows"] == 64
        self.remote = RemoteEngine(reader, writer, hello["manifest"]["name"], Metrics())
        return self.remote

    async def __aexit__(self, *exc: object) -> None:
        await self.remote.stop()
        self.control.send(("stop", None))
        assert await asyncio.wait_for(self.task, 30) == 0
        self.folder.cleanup()


def test_remote_engine_answers_what_a_local_engine_answers(checkpoint: Path) -> None:
    """Same seed, same backend: the answers that cross the socket are the local engine's, number for number
    (plain, certified, and a sequential-sampling round's raw logits)."""
    settings = settings_for(checkpoint)

    async def scenario() -> None:
        backend, manifest = load_backend(settings)
        local = Engine(backend, "tiny", manifest.spec.smoothing.sigma, Metrics(), 4096, 0.0, 64)
        local.start()
        async with ModelProcessInLoop(settings) as remote:
            x = images(3)
            for kwargs in ({"seed": 5}, {"seed": 6, "certify_alpha": 0.01, "selection_samples": 8}):
                mine = await local.predict(x, 16, "softmax", **kwargs)  # type: ignore[arg-type]
                theirs = await remote.predict(x, 16, "softmax", **kwargs)  # type: ignore[arg-type]
                assert theirs == mine
            assert [a.certificate is not None for a in theirs] == [True] * 3
            mine_logits = await local.copy_logits(x, 7, 9, 30.0)
            theirs_logits = await remote.copy_logits(x, 7, 9, 30.0)
            assert len(theirs_logits) == 3 and all(t.shape == (7, 10) for t in theirs_logits)
            assert all(torch.equal(a, b) for a, b in zip(mine_logits, theirs_logits, strict=True))
            # unseeded requests from one worker are batched together in the model process
            answers = await asyncio.gather(*(remote.predict(images(1, s), 4, "vote") for s in range(6)))
            assert all(len(a) == 1 and a[0].prediction.samples == 4 for a in answers)
        await local.stop()

    asyncio.run(scenario())


def test_refusals_cross_as_the_same_errors(checkpoint: Path) -> None:
    async def scenario() -> None:
        async with ModelProcessInLoop(settings_for(checkpoint, max_queue=1)) as remote:
            with pytest.raises(DeadlineExceededError, match="no time left"):
                await remote.predict(images(1), 4, "softmax", timeout=0)
            results = await asyncio.gather(*(remote.predict(images(1), 256, "softmax") for _ in range(4)),
                                           return_exceptions=True)
            assert any(isinstance(r, QueueFullError) for r in results), results
            assert any(isinstance(r, list) for r in results), results

    asyncio.run(scenario())


def test_wire_round_trips_answers_and_errors() -> None:
    from models.smooth import Certificate, Prediction
    from service.engine import Answer

    answers = [Answer(Prediction(3, [0.1, 0.2 / 3, 1 - 0.1 - 0.2 / 3], 0.75, 16), Certificate(3, 0.25, 0.6, [1, 15]),
                      None),
               Answer(Prediction(-1, [0.5, 0.5], 0.5, 40), None, False)]
    import json
    assert decode_answers(json.loads(json.dumps(encode_answers(answers)))) == answers
    overloaded = decode_error(encode_error(OverloadedError("busy", 7)))
    assert isinstance(overloaded, OverloadedError) and overloaded.retry_after_s == 7 and str(overloaded) == "busy"
    for error in (QueueFullError("full"), DeadlineExceededError("late"), ShuttingDownError("bye")):
        assert type(decode_error(encode_error(error))) is type(error)
    failure = decode_error(encode_error(ValueError("bad weights")))
    assert isinstance(failure, ModelProcessError) and str(failure) == "ValueError: bad weights"


def test_a_cancelled_request_is_dropped_by_the_model_process(checkpoint: Path) -> None:
    """A client that leaves cancels its request in the worker; the model process must stop computing it
    (it drops images between chunks: 64 images of 64 copies, one image per chunk)."""
    rows = 64 * 64

    async def scenario() -> None:
        model = ModelProcessInLoop(settings_for(checkpoint))
        async with model as remote:
            engine = model.state.engine
            assert isinstance(engine, Engine)
            request = asyncio.create_task(remote.predict(images(64), 64, "softmax"))
            await until(lambda: engine._busy)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            await until(lambda: not engine._busy)
            computed = model.state.metrics.registry.get_sample_value("siam_rows_total", {"model": "tiny"})
            assert computed is not None and computed < rows / 2, computed

    asyncio.run(scenario())


def test_the_model_process_reads_the_ids_a_worker_signed_and_takes_feedback_once(checkpoint: Path) -> None:
    """A worker signs its answers' ids with the secret it shares with the model process (one Settings, as the
    supervisor hands it to every child); the model process reads what each id answered and counts it once.
    An id signed with another secret, or not an id at all, is unknown."""

    async def scenario() -> None:
        settings = settings_for(checkpoint)
        async with ModelProcessInLoop(settings) as remote:
            worker_ids = PredictionIds(settings.feedback_secret.get_secret_value(), "tiny", settings.feedback_ttl_s)
            ids = [worker_ids.issue(3, 16), worker_ids.issue(1, 4)]
            issued = await remote.recall(ids[0])
            assert issued is not None and (issued.label, issued.samples, issued.model) == (3, 16, "tiny")
            assert await remote.recall(ids[0]) is None  # once only
            issued = await remote.recall(ids[1])
            assert issued is not None and (issued.label, issued.samples) == (1, 4)
            stranger = PredictionIds("another secret, 16+ chars", "tiny", settings.feedback_ttl_s)
            assert await remote.recall(stranger.issue(3, 16)) is None
            assert await remote.recall("nobody") is None
            canary = await remote.predict(images(1), 8, "vote", internal=True)
            assert canary[0].prediction.samples == 8

    asyncio.run(scenario())


def test_a_model_process_on_the_feedback_file_remembers_its_predecessors_feedback(checkpoint: Path,
                                                                                   tmp_path: Path) -> None:
    """SIAM_FEEDBACK_DB under ``--workers N``: a model process restarted in place refuses feedback its
    predecessor took. When the file is locked past the busy timeout the worker gets FeedbackUnavailableError
    (503) and the connection goes on serving: the retry is taken."""

    async def scenario() -> None:
        settings = settings_for(checkpoint, feedback_db=tmp_path / "feedback.sqlite")
        ids = PredictionIds(settings.feedback_secret.get_secret_value(), "tiny", settings.feedback_ttl_s)
        issued = [ids.issue(k, 16) for k in range(3)]
        async with ModelProcessInLoop(settings) as remote:
            assert await remote.recall(issued[0]) is not None
        successor = ModelProcessInLoop(settings)
        async with successor as remote:
            assert await remote.recall(issued[0]) is None  # taken before the restart
            assert successor.state.feedback is not None
            with (locked_feedback_file(successor.state.feedback, tmp_path / "feedback.sqlite", busy_timeout_s=0.1),
                  pytest.raises(FeedbackUnavailableError, match="could not be written")):
                await remote.recall(issued[1])
            answer = await remote.recall(issued[1])
            assert answer is not None and answer.label == 1
            assert (await remote.predict(images(1), 4, "softmax"))[0].prediction.samples == 4

    asyncio.run(scenario())


@pytest.mark.parametrize("processes", [1, 2, 3, 16])
def test_every_worker_asks_the_same_model_process_about_an_id_and_ids_spread_over_them(processes: int) -> None:
    ids = PredictionIds("a secret of sixteen chars", "tiny", 60.0)
    issued = [ids.issue(i % 10, 16) for i in range(400)]
    owners = [owner(i, processes) for i in issued]
    assert owners == [owner(i, processes) for i in issued] and set(owners) == set(range(processes))
    assert all(0 <= owner(made_up, processes) < processes for made_up in ("", "nope", "ünïcode", "\ud800"))


def test_feedback_through_any_worker_counts_once_in_the_process_that_owner_names(checkpoint: Path) -> None:
    """Two model processes, as ``--model-processes 2`` runs them: a worker's router asks the one :func:`owner`
    names, so an id takes feedback once whichever worker (and router) the feedback reaches."""

    async def scenario() -> None:
        settings = settings_for(checkpoint, model_processes=2)
        one, two = ModelProcessInLoop(settings, index=0), ModelProcessInLoop(settings, index=1)
        async with one as first, two as second:
            router, other_worker = FeedbackRouter([first, second]), FeedbackRouter([first, second])
            ids = PredictionIds(settings.feedback_secret.get_secret_value(), "tiny", settings.feedback_ttl_s)
            issued = [ids.issue(k % 10, 16) for k in range(20)]
            for k, i in enumerate(issued):
                answer = await router.recall(i)
                assert answer is not None and answer.label == k % 10
                assert await other_worker.recall(i) is None  # the same owner remembers it was taken
            kept = [len(one.state.feedback), len(two.state.feedback)]  # type: ignore[arg-type]
            assert sum(kept) == 20 and min(kept) > 0  # each remembers its own share, and both had some

    asyncio.run(scenario())


def test_a_lost_model_process_fails_waiting_requests_with_503() -> None:
    """The model process answers hello, takes a request, then dies: the request and every later one get
    ShuttingDownError (503 with Retry-After), and the worker turns not-ready."""

    async def scenario() -> None:
        folder = tempfile.TemporaryDirectory(prefix="siam-test-")
        path = Path(folder.name, "model.sock")

        async def dying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(frame({"ready": True}))
            await reader.readexactly(8)
            writer.close()

        server = await asyncio.start_unix_server(dying, path=str(path))
        reader, writer, _ = await connect(path)
        lost: list[bool] = []
        remote = RemoteEngine(reader, writer, "tiny", Metrics(), on_lost=lambda: lost.append(True))
        with pytest.raises(ShuttingDownError, match="model process stopped"):
            await asyncio.wait_for(remote.predict(images(1), 4, "softmax"), 10)
        assert lost == [True]
        with pytest.raises(ShuttingDownError):
            await remote.predict(images(1), 4, "softmax")
        await remote.stop()
        server.close()
        folder.cleanup()

    asyncio.run(scenario())


class FakeModelProcess:
    """A model process's socket that says ``hello`` and answers every request with ``label``, and that can
    die as a killed process does (every connection closed)."""

    def __init__(self, path: Path, hello: dict, label: int = 0):
        self.path, self.hello, self.label = path, hello, label
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> FakeModelProcess:
        self.server = await asyncio.start_unix_server(self.answer, path=str(self.path))
        return self

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(frame(self.hello))
        if not self.hello["ready"]:
            writer.close()
            return
        try:
            while True:
                header, _ = await read_frame(reader)
                answer = Answer(Prediction(self.label, [0.1] * 10, 1.0, header["samples"]))
                writer.write(frame({"id": header["id"], "answers": encode_answers([answer])}))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    def die(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()


def test_a_worker_waits_for_its_restarted_model_process_and_serves_through_it(
        checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Its model process dies: the worker turns not ready (503 with Retry-After 1, saying why), waits
    through a successor that could not load, and serves through the one that loaded."""
    monkeypatch.setattr(model_links, "NOT_LOADED_RETRY_S", 0.01)
    manifest = read_manifest(checkpoint).model_dump(mode="json")
    ready = {"ready": True, "manifest": manifest, "runtime": {"device": "fake"}, "backend": "fake", "chunk_rows": 64}

    async def scenario() -> None:
        folder = tempfile.TemporaryDirectory(prefix="siam-test-")
        path = Path(folder.name, "model.sock")
        first = await FakeModelProcess(path, ready, label=1).start()
        state = ServiceState(settings_for(checkpoint))
        links = ModelLinks(state, [path])
        await links.open()
        assert state.ready and state.feedback is state.engine and state.backend.name == "fake"
        assert state.model_name == "tiny" and state.backend.chunk_rows == 64
        assert [a.label for a in await state.engine.predict(images(1), 4, "softmax")] == [1]
        # the ids this worker signs are the model process's to read: the supervisor's secret, this model
        s = state.settings
        model_side = PredictionIds(s.feedback_secret.get_secret_value(), "tiny", s.feedback_ttl_s)
        assert state.ids is not None and model_side.read(state.ids.issue(3, 4)) is not None

        first.die()
        await until(lambda: not state.ready)
        assert state.restarting and state.load_error == model_links.RESTARTING
        assert len(links.relinking) == 1  # the task is held (asyncio keeps only a weak reference to it)
        with pytest.raises(ModelLostError):
            await state.engine.predict(images(1), 4, "softmax")
        with pytest.raises(ServiceUnavailableError) as refused:
            serving(SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(siam=state))))  # type: ignore[arg-type]
        assert refused.value.retry_after_s == 1 and "waiting for it to restart" in str(refused.value)

        broken = await FakeModelProcess(path, {"ready": False, "load_error": "out of memory"}).start()
        await until(lambda: "out of memory" in (state.load_error or ""))
        assert not state.ready
        broken.die()
        # A successor that dies before its hello (the connection closes at once): the worker tries again.
        hung_up: list[bool] = []

        def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            hung_up.append(True)
            writer.close()

        mute = await asyncio.start_unix_server(hang_up, path=str(path))
        await until(lambda: len(hung_up) >= 2)  # tried, hung up on, and tried again
        mute.close()

        lost_engine = state.engine
        second = await FakeModelProcess(path, ready, label=2).start()
        await until(lambda: state.ready and not links.relinking)  # the task also ends (and lets go of itself)
        assert state.engine is not lost_engine and state.feedback is state.engine and state.links == [state.engine]
        assert not state.restarting and state.load_error is None
        assert "model process 0 is back: serving again" in caplog.messages
        assert state.engine.model_name == state.model_name == "tiny" and state.engine.metrics is state.metrics
        assert state.backend.chunk_rows == 64 and state.backend.describe() == {"device": "fake"}
        assert [a.label for a in await state.engine.predict(images(1), 4, "softmax")] == [2]
        second.die()  # and again: the new link watches for its own loss too
        await until(lambda: not state.ready)
        await state.engine.stop()
        for task in links.relinking:
            task.cancel()
        folder.cleanup()

    with caplog.at_level(logging.WARNING, logger="siam.worker"):
        asyncio.run(scenario())


def test_a_worker_whose_supervisor_is_gone_drains_instead_of_waiting(checkpoint: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody will restart the model process: the worker sends itself SIGTERM (drain, then exit)."""
    signals: list[tuple[int, int]] = []
    monkeypatch.setattr(model_links.os, "kill", lambda pid, sig: signals.append((pid, sig)))
    manifest = read_manifest(checkpoint).model_dump(mode="json")
    ready = {"ready": True, "manifest": manifest, "runtime": {}, "backend": "fake", "chunk_rows": 64}

    async def scenario() -> None:
        folder = tempfile.TemporaryDirectory(prefix="siam-test-")
        path = Path(folder.name, "model.sock")
        model = await FakeModelProcess(path, ready).start()
        state = ServiceState(settings_for(checkpoint))
        links = ModelLinks(state, [path])
        await links.open()
        links.parent = -1  # as if the supervisor had died and this process been adopted
        model.die()
        await until(lambda: bool(signals))
        assert signals == [(os.getpid(), signal.SIGTERM)] and state.ready is False and not links.relinking

        # The supervisor dies while the worker waits for a restarted model process: it stops waiting.
        signals.clear()
        state = ServiceState(settings_for(checkpoint))
        model = await FakeModelProcess(path, ready).start()
        links = ModelLinks(state, [path])
        await links.open()
        model.die()
        await until(lambda: not state.ready)
        assert links.relinking and not signals
        links.parent = -1
        await until(lambda: bool(signals))
        assert signals == [(os.getpid(), signal.SIGTERM)]
        await until(lambda: not links.relinking)
        folder.cleanup()

    asyncio.run(scenario())


# --- the whole thing, in processes of its own ----------------------------------------------------------


def post(url: str, samples: int, query: str = "", timeout: float = 60) -> tuple[int, dict]:
    r = httpx.post(f"{url}/predict?samples={samples}{query}", json=BODY, timeout=timeout)  # new connection each
    return r.status_code, r.json()


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT spreads connections on Linux")
def test_each_worker_gets_its_own_socket_on_the_port_and_connections_spread_over_them() -> None:
    """64 connections made at once to four sockets: each socket holds some of them, waiting to be accepted.
    (With one shared socket, the worker that woke first took them all.) A socket that none holds is odds of
    4 x (3/4)^64, about 4e-8."""
    listeners = listening_sockets("127.0.0.1", 0, 4)
    clients: list[socket.socket] = []
    try:
        port = listeners[0].getsockname()[1]
        assert len({id(s) for s in listeners}) == 4 and {s.getsockname()[1] for s in listeners} == {port}
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
        accepted = []
        for listener in listeners:
            listener.setblocking(False)
            count = 0
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and sum(accepted) + count < 64:
                try:
                    listener.accept()[0].close()
                    count += 1
                except BlockingIOError:
                    if count:  # this socket's queue is empty: the rest are in the others'
                        break
                    time.sleep(0.01)  # (a handshake may still be completing)
            accepted.append(count)
        assert sum(accepted) == 64 and min(accepted) >= 1, accepted
    finally:
        for s in [*clients, *listeners]:
            s.close()


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT spreads connections on Linux")
@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so-reuseport"])
def test_a_port_held_by_another_program_fails_the_start_even_one_that_allows_sharing(reuse_port: bool) -> None:
    """SO_REUSEPORT alone would let the workers join another program's SO_REUSEPORT socket and take half of
    its connections: the start must fail instead, as it does for a plain one."""
    holder = socket.socket()
    if reuse_port:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        with pytest.raises(SystemExit):  # (uvicorn's bind: it logs the error and exits with status 3)
            listening_sockets("127.0.0.1", holder.getsockname()[1], 2)
    finally:
        holder.close()


@pytest.mark.subprocess
@pytest.mark.parametrize("model_processes", [1, 2])
def test_workers_answer_share_feedback_and_sum_metrics(checkpoint: Path, model_processes: int) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(settings_for(checkpoint, warmup=True))) as one_process:
        expected = one_process.post("/predict?samples=16&seed=11&certify=true", json=BODY).json()
    with Server(checkpoint, "--workers", "2", "--model-processes", str(model_processes), "--backend", "torch",
                "--chunk-rows", "64", "--allow-seed") as server:
        status, answer = post(server.url, 16, "&seed=11&certify=true")
        assert status == 200
        for key in ("label", "probabilities", "vote_share", "radius", "p_lower", "abstained"):
            assert answer[key] == expected[key], key
        # Connections spread over the workers; a prediction id must take feedback through any of them.
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: post(server.url, 4), range(16)))
        assert [s for s, _ in answers] == [200] * 16
        feedback = [httpx.post(f"{server.url}/feedback", json={"id": a["id"], "label": 0}, timeout=10)
                    for _, a in answers]
        assert [r.status_code for r in feedback] == [200] * 16, [r.text for r in feedback]
        # Counters from every process, summed: 17 predictions, 16 with feedback, whichever worker answers.
        assert metric(server.url, "siam_predictions_total") == 17
        assert metric(server.url, "siam_feedback_total") == 16
        assert metric(server.url, "siam_model_info{") == 1
        # Every process labels its series with the model's name, the zero series made before any event too.
        text = httpx.get(f"{server.url}/metrics", timeout=5).text
        assert set(re.findall(r'model="([^"]*)"', text)) == {"tiny"}
        models = httpx.get(f"{server.url}/v1/models", timeout=5).json()["models"]
        assert models[0]["name"] == "tiny" and models[0]["runtime"]["backend"] == "torch"
        sequential = httpx.post(f"{server.url}/predict?samples=64&confidence=0.99", json=BODY, timeout=30).json()
        assert sequential["samples_used"] <= 64 and "decided" in sequential


@pytest.mark.subprocess
@pytest.mark.parametrize(("to_group", "model_processes"), [(False, 1), (True, 1), (False, 2)],
                         ids=["sigterm-to-siam-serve", "sigint-to-the-group", "sigterm-two-model-processes"])
def test_workers_finish_accepted_requests_on_sigterm_then_exit(checkpoint: Path, to_group: bool,
                                                               model_processes: int) -> None:
    """SIGTERM to `siam serve` alone (as `docker stop` sends it), or SIGINT to every process (Ctrl-C in a
    terminal): either way every accepted request is answered and the service exits 0; with two model
    processes too."""
    server = Server(checkpoint, "--workers", "2", "--model-processes", str(model_processes), "--backend", "torch",
                    "--chunk-rows", "256")
    with server:
        with ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(post, server.url, 1024) for _ in range(4)]
            deadline = time.monotonic() + 30
            # Accepted: inside the model process's engine, waiting or taken into a batch (summed over the
            # processes). Counting requests in flight was not enough: one still reading its body when the
            # signal came was refused 503 "shutting down", as a request that arrived after it would be.
            while (metric(server.url, "siam_queue_length")
                   + metric(server.url, "siam_queue_wait_seconds_count")) < 4:
                assert time.monotonic() < deadline, "the requests were not all accepted"
                time.sleep(0.02)
            if to_group:
                os.killpg(server.proc.pid, signal.SIGINT)
            else:
                server.proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in pending]
        assert [a[0] for a in answers] == [200] * 4, answers
        assert server.proc.wait(60) == 0, server.output()[-3000:]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/health/live", timeout=2)


@pytest.mark.subprocess
def test_sigterm_to_the_group_of_an_idle_service_is_a_clean_exit(tmp_path: Path) -> None:
    """SIGTERM to every process of the group (systemd's default KillMode, `timeout`, `kill -- -PGID`):
    workers with nothing to finish (here: no model, kept up not-ready) exit at once, before `siam serve`
    has stopped them. That is the shutdown asked for (status 0), not a worker dying (status 1)."""
    server = Server(tmp_path / "nonexistent", "--workers", "2", "--no-exit-on-load-error")
    server.spec.health_path = "/health/live"
    with server:
        assert httpx.get(f"{server.url}/health/ready", timeout=5).status_code == 503
        os.killpg(server.proc.pid, signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.output()[-3000:]


def serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args, "--port", "0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_a_worker_told_to_stop_gives_up_on_a_model_process_that_never_answers(tmp_path: Path) -> None:
    """A model process that failed to load closes its socket: a worker that connects after that must not retry
    until its supervisor kills it (35 s later), but end its start-up, not ready, once it is told to stop."""
    async def scenario() -> tuple[float, str | None]:
        state = ServiceState(Settings(checkpoint=tmp_path))
        stopping = asyncio.get_running_loop().call_later(0.3, lambda: setattr(state, "draining", True))
        start = time.monotonic()
        await asyncio.wait_for(start_worker(state, [tmp_path / "never.sock"]), 10)
        stopping.cancel()
        return time.monotonic() - start, state.load_error

    took, error = asyncio.run(scenario())
    assert 0.25 <= took < 5 and error is not None and "stopped before the model process" in error
    with pytest.raises(ConnectionAbortedError):
        asyncio.run(asyncio.wait_for(connect(tmp_path / "never.sock", stop=lambda: True), 10))


@pytest.mark.subprocess
def test_workers_exit_on_a_load_error_and_refuse_a_per_process_rate_limit_or_too_few_workers(tmp_path: Path) -> None:
    start = time.monotonic()
    done = serve(str(tmp_path / "nonexistent"), "--workers", "2")
    assert done.returncode == 1 and "could not load" in done.stderr, done.stderr[-2000:]
    # A worker still starting when the load failed used to wait for the supervisor to kill it, in about half
    # the runs: 41 s to 76 s instead of 7 s.
    assert "did not stop" not in done.stderr and time.monotonic() - start < 30, done.stderr[-2000:]
    done = serve(str(tmp_path), "--workers", "2", "--rate-limit-per-s", "5", timeout=30)
    assert done.returncode == 1 and "rate-limit" in done.stderr, done.stderr[-2000:]
    done = serve(str(tmp_path), "--workers", "2", "--model-processes", "3", timeout=30)
    assert done.returncode == 1 and "needs at least as many --workers" in done.stderr, done.stderr[-2000:]


def count(url: str, name: str, labels: str) -> float:
    """One labelled series of /metrics (summed over the processes by the multiprocess collector)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name}{{{labels}}}"))


def wait_for(condition: object, timeout: float, what: str) -> None:
    """Poll ``condition()`` until true, within a bound."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.05)


@pytest.mark.subprocess
def test_a_dead_model_process_or_worker_is_restarted_and_the_service_answers_again(checkpoint: Path) -> None:
    """kill -9 of the model process: requests meanwhile are answered 503 with Retry-After at once (never a
    hang, never another 5xx), the workers turn ready again once the new process has loaded, and predictions
    are answered, and an answer given before the kill still takes its feedback (its id is signed, not kept
    by the process that died); then kill -9 of a worker: it is replaced on its own socket. Each restart counts
    in siam_process_restarts_total, and the service still stops cleanly."""
    server = Server(checkpoint, "--workers", "2", "--backend", "torch", "--log-level", "info")
    with server:
        found = re.search(r"model process (\d+), 2 HTTP workers \((\d+), (\d+)\)", server.output())
        assert found, server.output()[-3000:]
        model, worker = int(found.group(1)), int(found.group(2))
        assert count(server.url, "siam_process_restarts_total", 'process="model"') == 0
        before = [post(server.url, 4)[1] for _ in range(2)]
        os.kill(model, signal.SIGKILL)
        statuses: list[int] = []

        def answered() -> bool:
            r = httpx.post(f"{server.url}/predict?samples=4", json=BODY, timeout=30)
            statuses.append(r.status_code)
            if r.status_code == 503:
                # back in about 2 s here: Retry-After 1, not the 5 of a service shutting down
                assert r.headers["retry-after"] == "1" and "model process" in r.json()["detail"], r.text
            return r.status_code == 200

        wait_for(answered, 90, "an answer after the model process was killed")
        assert statuses[0] == 503 and set(statuses) == {200, 503}, statuses  # the new one takes seconds to load
        assert "siam-model exited with status -9: restarted as process" in server.output()
        for _ in range(8):  # connections spread over both workers: each has its new link
            assert post(server.url, 4)[0] == 200
        assert count(server.url, "siam_process_restarts_total", 'process="model"') == 1
        assert count(server.url, "siam_errors_total", 'kind="not_ready"') == statuses.count(503)
        assert count(server.url, "siam_errors_total", 'kind="shutting_down"') == 0
        assert httpx.get(f"{server.url}/health/ready", timeout=5).status_code == 200
        fed = [httpx.post(f"{server.url}/feedback", json={"id": b["id"], "label": b["label"]}, timeout=10)
               for b in before]
        assert [r.status_code for r in fed] == [200, 200] and all(r.json()["correct"] for r in fed), fed

        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: "siam-http-0 exited with status -9: restarted as process" in server.output(), 30,
                 "the worker's restart")
        wait_for(lambda: count(server.url, "siam_process_restarts_total", 'process="http"') == 1, 60,
                 "the new worker's start in /metrics")
        codes = [post(server.url, 4)[0] for _ in range(16)]
        assert codes == [200] * 16, codes
    assert server.proc.returncode == 0, server.output()[-3000:]


def test_restarts_stop_once_the_budget_is_spent_and_come_back_after_the_window() -> None:
    now = [0.0]
    budget = RestartBudget(allowed=3, window_s=60, clock=lambda: now[0])
    taken = []
    for t in (0.0, 10.0, 20.0, 30.0):
        now[0] = t
        taken.append(budget.take())
    assert taken == [True, True, True, False]
    now[0] = 59.9
    assert not budget.take()  # the first restart still counts
    now[0] = 60.0
    assert budget.take() and not budget.take()  # one left the window: one more


def test_a_process_that_dies_past_the_budget_stops_the_service_with_its_status(tmp_path: Path) -> None:
    """The supervisor's answer to a crash loop: no restart, a message with the status, exit 1."""
    settings = Settings(checkpoint=tmp_path, workers=2)  # type: ignore[call-arg]
    supervisor = Supervisor(settings, tmp_path, [], RestartBudget(allowed=0))
    dead = multiprocessing.get_context("spawn").Process(target=sys.exit, args=(3,), name="siam-model")
    dead.start()
    dead.join(30)
    supervisor.models, supervisor.controls = [dead], [multiprocessing.Pipe()[0]]
    message = supervisor.restart(dead)
    assert message == "siam serve: siam-model exited with status 3; 0 restarts within 60 s already: giving up"
    assert supervisor.models == [dead]  # nothing started


class StandInSupervisor(Supervisor):
    """The real supervisor with children that only live (tests/stand_in_children.py), recording each start."""

    def __init__(self, settings: Settings, folder: Path, signalled: list[int], budget: RestartBudget,
                 load_error: str | None = None, stubborn: bool = False):
        super().__init__(settings, folder, signalled, budget)
        self.started: list[tuple[str, int, bool]] = []
        self.load_error = load_error
        self.stubborn = [self.ctx.Event() for _ in range(settings.model_processes + settings.workers)] if stubborn \
            else []

    def stand_in(self, *args: object, name: str) -> BaseProcess:
        stubborn = self.stubborn[len(self.started)] if self.stubborn else None
        process = self.ctx.Process(target=hold, args=(*args, stubborn), name=name)
        process.start()
        return process

    def model_process(self, k: int, restarted: bool = False) -> tuple[BaseProcess, Connection]:
        control, model_end = self.ctx.Pipe()
        message = None if self.load_error is None else ("load_error", self.load_error)
        model = self.stand_in(model_end, message, name="siam-model")
        model_end.close()
        self.started.append(("model", k, restarted))
        return model, control

    def worker(self, i: int, restarted: bool = False) -> BaseProcess:
        worker = self.stand_in(None, None, name=f"siam-http-{i}")
        self.started.append(("http", i, restarted))
        return worker


def test_the_supervisor_restarts_each_dead_child_in_its_place_until_the_budget_is_spent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    caplog.set_level(logging.INFO, logger="siam.serve")
    signalled: list[int] = []
    supervisor = StandInSupervisor(Settings(checkpoint=tmp_path, workers=2, port=0),  # type: ignore[call-arg]
                                   tmp_path, signalled, RestartBudget(allowed=2))
    supervisor.start()
    assert supervisor.started == [("model", 0, False), ("http", 0, False), ("http", 1, False)]
    # The line that operators, the restart drill and the tests read the process ids from:
    port = supervisor.listeners[0].getsockname()[1]
    pids = [supervisor.models[0].pid, *(w.pid for w in supervisor.workers)]
    assert caplog.messages[-1] == f"model process {pids[0]}, 2 HTTP workers ({pids[1]}, {pids[2]}) on 127.0.0.1:{port}"

    def restarts() -> int:
        return sum("restarted as process" in m for m in caplog.messages)

    watched: list[str | None] = []
    watching = threading.Thread(target=lambda: watched.append(supervisor.watch()))
    watching.start()
    try:
        model, control, first_worker = supervisor.models[0], supervisor.controls[0], supervisor.workers[0]
        live_gauges = tmp_path / f"gauge_livesum_{model.pid}.db"  # what prometheus-client keeps of its gauges
        live_gauges.write_bytes(b"")
        model.kill()
        wait_for(lambda: restarts() == 1, 30, "the model process's restart")  # logged last
        assert supervisor.started[3] == ("model", 0, True)
        assert supervisor.models[0] is not model and supervisor.models[0].is_alive()
        assert control.closed and supervisor.controls[0] is not control and not supervisor.closed
        assert not live_gauges.exists()  # its in-flight and queue gauges no longer count in the sums
        assert (f"siam-model exited with status -9: restarted as process {supervisor.models[0].pid}"
                in caplog.messages)

        second_worker = supervisor.workers[1]
        second_worker.kill()
        wait_for(lambda: restarts() == 2, 30, "the worker's restart")
        assert supervisor.started[4] == ("http", 1, True)
        assert supervisor.workers[0] is first_worker and supervisor.workers[1] is not second_worker
        assert supervisor.workers[1].is_alive()
        assert (f"siam-http-1 exited with status -9: restarted as process {supervisor.workers[1].pid}"
                in caplog.messages)

        supervisor.models[0].kill()  # a third death within the minute: a crash loop
        watching.join(30)
        assert watched == ["siam serve: siam-model exited with status -9; 2 restarts within 60 s already: "
                           "giving up"]
        assert len(supervisor.started) == 5
        workers_gauges = [tmp_path / f"gauge_livesum_{w.pid}.db" for w in supervisor.workers]
        for path in workers_gauges:
            path.write_bytes(b"")
    finally:
        signalled.append(signal.SIGTERM)
        watching.join(30)
        supervisor.stop()  # "stop" to a model process already gone is no error
    assert [w.exitcode for w in supervisor.workers] == [-signal.SIGTERM] * 2  # told to stop
    assert not any(path.exists() for path in workers_gauges)
    assert supervisor.listeners[0].fileno() == -1


def test_the_supervisor_stops_workers_then_model_processes_killing_any_past_the_grace_period(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    for stubborn in (False, True):
        caplog.clear()
        settings = Settings(checkpoint=tmp_path, workers=1, port=0, graceful_timeout_s=0.1)  # type: ignore[call-arg]
        supervisor = StandInSupervisor(settings, tmp_path, [], RestartBudget(), stubborn=stubborn)
        supervisor.start()
        for ignoring in supervisor.stubborn:  # SIGTERM ignored before it is sent
            assert ignoring.wait(30)
        began = time.monotonic()
        supervisor.stop()
        took = time.monotonic() - began
        if stubborn:  # each waited for its grace (graceful_timeout_s + 5 s: 5.1 s), then killed
            assert caplog.messages[-2:] == ["process siam-http-0 did not stop within 5 s: killed",
                                            "process siam-model did not stop within 5 s: killed"]
            assert [supervisor.workers[0].exitcode, supervisor.models[0].exitcode] == [-9, -9] and took >= 10
        else:  # the worker by SIGTERM, the model process by "stop" on its control pipe
            assert [supervisor.workers[0].exitcode, supervisor.models[0].exitcode] == [-signal.SIGTERM, 0]
            assert took < 5 and "did not stop" not in caplog.text


def test_the_supervisor_stops_on_a_load_error_unless_told_to_wait_and_on_a_signal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    for exit_on_load_error in (True, False):
        caplog.clear()
        signalled: list[int] = []
        settings = Settings(checkpoint=tmp_path, workers=1, port=0,  # type: ignore[call-arg]
                            exit_on_load_error=exit_on_load_error)
        supervisor = StandInSupervisor(settings, tmp_path, signalled, RestartBudget(), load_error="out of memory")
        supervisor.start()
        watched: list[str | None] = []
        watching = threading.Thread(target=lambda: watched.append(supervisor.watch()))  # noqa: B023
        with caplog.at_level(logging.INFO, logger="siam.serve"):
            watching.start()
            try:
                if exit_on_load_error:
                    watching.join(30)
                    assert watched == [f"siam serve: could not load {tmp_path}: out of memory"]
                else:  # it logs, and keeps serving 503 (the health checks say why) until told to stop
                    wait_for(lambda: f"could not load {tmp_path}: out of memory" in caplog.messages, 30,
                             "the load error in the log")
                    still = time.monotonic() + 1.0  # watching on, past its 0.5 s poll
                    while time.monotonic() < still:
                        assert watching.is_alive() and not watched
                        time.sleep(0.05)
                    signalled.append(signal.SIGTERM)  # as its handler does: noticed at the next poll
                    watching.join(5)
                    assert watched == [None]
                    assert (f"signal {signal.SIGTERM.value}: draining the workers, then the model process"
                            in caplog.messages)
            finally:
                signalled.append(signal.SIGTERM)
                watching.join(30)
                supervisor.stop()
        assert supervisor.started == [("model", 0, False), ("http", 0, False)]  # nothing restarted


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's exit is reaped by whoever adopted it, maybe never)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.subprocess
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_without_their_supervisor_the_model_process_and_workers_exit(checkpoint: Path) -> None:
    """kill -9 of `siam serve` itself: nobody is left to restart anything, so its children must not wait
    for a restart for ever (holding the port): the model process stops, and the workers drain and exit."""
    server = Server(checkpoint, "--workers", "2", "--backend", "torch", "--log-level", "info")
    with server:
        found = re.search(r"model process (\d+), 2 HTTP workers \((\d+), (\d+)\)", server.output())
        assert found, server.output()[-3000:]
        children = [int(pid) for pid in found.groups()]
        assert all(running(pid) for pid in children)
        server.proc.kill()
        wait_for(lambda: not any(running(pid) for pid in children), 60, "the children's exit")
