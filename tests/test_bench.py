"""``siam bench``: the whole pipeline on a tiny run, and the arithmetic that turns measurements into claims."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import report
from benchmarks.bench import limit_chunks, rounds_fit, warmup_for
from benchmarks.bench import main as bench_main
from benchmarks.load import closed_loop_rate, read_response
from models import save_checkpoint

HAS_LITSERVE = importlib.util.find_spec("litserve") is not None


@pytest.mark.timeout(120)
def test_quick_bench_writes_every_section_with_measured_ratios(tiny_checkpoint: Path, tmp_path: Path) -> None:
    systems = "siam,siam-workers,fastapi,fastapi-onnx,instant" + (",litserve" if HAS_LITSERVE else "")
    output = tmp_path / "bench.json"
    bench_main(["--quick", "--checkpoint", str(tiny_checkpoint), "--samples", "1,4", "--concurrency", "1,2",
                "--duration", "0.4", "--warmup", "0.1", "--chunks", "16,32", "--limit-budget", "0.05",
                "--threads", "1", "--all-cells", "--systems", systems, "--onnx-cache", str(tmp_path / "onnx"),
                "--output", str(output)])
    results = json.loads(output.read_text())
    assert output.with_suffix(".png").stat().st_size > 10_000

    assert {"command", "machine", "settings", "limit", "engine", "http", "targets", "wall_s"} <= results.keys()
    assert results["machine"]["cores"] and results["machine"]["torch"]
    limit = results["limit"]["reference_rows_per_s"]
    backends = {b["backend"]: b for b in results["limit"]["backends"]}
    assert list(backends) == ["torch", "onnx", "onnx-per-chunk", "onnx-bare", "onnx-bare-per-chunk",
                              "onnx-torch-noise", "onnx-int8"]
    for name in ("onnx-per-chunk", "onnx-bare-per-chunk"):  # one thread has nothing to share: said, not hidden
        assert "--threads 2 or more" in backends[name]["error"]
    best = max(backends[name]["best_rows_per_s"] for name in ("torch", "onnx"))  # the served ones
    assert limit == max(best, results["limit"]["recheck_rows_per_s"]) > 0
    for b in backends.values():
        if b["error"]:
            continue
        assert b["best_rows_per_s"] == pytest.approx(max(b["rates"].values()), abs=0.1)
        assert b["ratio_to_limit"] == pytest.approx(b["best_rows_per_s"] / limit)
    # The network without its noise is measured beside the limit, and the HTTP cells are judged against it.
    assert results["limit"]["bare_rows_per_s"] == backends["onnx-bare"]["best_rows_per_s"] > 0
    assert "no int8 graph" in backends["onnx-int8"]["error"]  # the tiny checkpoint has none: said, not hidden

    engine = results["engine"]["results"]
    assert [r["samples"] for r in engine] == [1, 4]
    for r in engine:
        assert r["completed"] > 0
        assert r["rows_per_s"] == pytest.approx(r["predictions_per_s"] * r["samples"])
        assert r["ratio_to_limit"] == pytest.approx(r["rows_per_s"] / limit)

    all_cells = results["http"]["cells"]
    assert {c["system"] for c in all_cells} == set(systems.split(","))
    # The load generator's ceiling (an instant server) once per client count, at the first m only.
    ceiling = [c for c in all_cells if c["system"] == "instant"]
    assert sorted((c["samples"], c["concurrency"]) for c in ceiling) == [(1, 1), (1, 2)]
    assert all(c["errors"] == 0 and c["completed"] > 0 and "ratio_to_limit" not in c for c in ceiling)
    cells = [c for c in all_cells if c["system"] != "instant"]
    assert len(cells) == 2 * 2 * (len(systems.split(",")) - 1)
    by_key = {(c["samples"], c["concurrency"], c["system"]): c for c in cells}
    headroom = {t["target"]: t for t in results["targets"]}[
        "load generator's ceiling / fastest system's pred/s (worst client count)"]
    fastest_lone = max(c["predictions_per_s"] for c in cells if c["concurrency"] == 1)
    fastest_pair = max(c["predictions_per_s"] for c in cells if c["concurrency"] == 2)
    ceilings = {c["concurrency"]: c["predictions_per_s"] for c in ceiling}
    assert headroom["value"] == pytest.approx(min(ceilings[1] / fastest_lone, ceilings[2] / fastest_pair))
    for c in cells:
        assert c["errors"] == 0, c["first_error"]
        assert c["completed"] > 0
        assert c["rows_per_s"] == pytest.approx(c["predictions_per_s"] * c["samples"])
        assert c["ratio_to_limit"] == pytest.approx(c["rows_per_s"] / limit)
        assert c["ratio_to_bare"] == pytest.approx(c["rows_per_s"] / results["limit"]["bare_rows_per_s"])
        plain = by_key[(c["samples"], c["concurrency"], "fastapi")]
        assert c["vs_fastapi"] == pytest.approx(c["rows_per_s"] / plain["rows_per_s"])
    assert results["http"]["systems"]["siam"]["runtime"]["backend"] in {"torch", "onnx"}
    assert results["http"]["systems"]["siam-workers"]["http_workers"] == 2  # `siam serve --workers 2`
    assert results["http"]["systems"]["siam-workers"]["runtime"]["backend"] in {"torch", "onnx"}
    overhead = {t["target"]: t for t in results["targets"]}["samples=1 overhead vs the best plain FastAPI service "
                                                            "(worst case)"]
    assert overhead["value"] is not None and "vs fastapi" in overhead["detail"]


@pytest.mark.timeout(120)
def test_bench_serves_sequential_cells_beside_fixed_ones_on_real_images(tiny_checkpoint: Path, tiny_cifar_tar: Path,
                                                                         tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    bench_main(["--quick", "--checkpoint", str(tiny_checkpoint), "--samples", "1,32", "--concurrency", "2",
                "--duration", "0.5", "--warmup", "0.1", "--chunks", "32", "--limit-budget", "0.05",
                "--threads", "1", "--all-cells", "--systems", "siam", "--onnx-cache", str(tmp_path / "onnx"),
                "--confidence", "0.99", "--data", str(tiny_cifar_tar), "--images", "8", "--output", str(output)])
    results = json.loads(output.read_text())
    cells = {(c["samples"], c["system"]): c for c in results["http"]["cells"]}
    assert set(cells) == {(1, "siam"), (32, "siam"), (32, "siam sequential 0.99")}  # none at m = 1
    sequential, fixed = cells[(32, "siam sequential 0.99")], cells[(32, "siam")]
    assert sequential["errors"] == fixed["errors"] == 0, sequential["first_error"] or fixed["first_error"]
    assert sequential["confidence"] == 0.99 and fixed["confidence"] is None
    # The first round is 16 copies, the second doubles to the budget: what the answers said they used.
    assert 16 <= sequential["mean_samples_used"] <= 32
    assert sequential["rows_per_s"] == pytest.approx(sequential["predictions_per_s"] * sequential["mean_samples_used"])
    assert fixed["rows_per_s"] == pytest.approx(fixed["predictions_per_s"] * 32)
    assert sequential["vs_fixed"] == pytest.approx(sequential["predictions_per_s"] / fixed["predictions_per_s"])
    goal = next(t for t in results["targets"] if t["target"].startswith("sequential pred/s at budget 32"))
    assert goal["value"] == pytest.approx(sequential["vs_fixed"]) and "copies per image" in goal["detail"]


@pytest.mark.timeout(120)
def test_repeated_cells_report_the_median_and_spread_of_their_runs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    bench_main(["--quick", "--checkpoint", str(tiny_checkpoint), "--samples", "2", "--concurrency", "1",
                "--duration", "0.3", "--warmup", "0.1", "--chunks", "32", "--limit-budget", "0.05", "--threads", "1",
                "--all-cells", "--systems", "siam,fastapi-onnx", "--repeats", "3",
                "--onnx-cache", str(tmp_path / "onnx"), "--output", str(output)])
    results = json.loads(output.read_text())
    cells = {c["system"]: c for c in results["http"]["cells"]}
    assert set(cells) == {"siam", "fastapi-onnx"}  # one cell per system, not one per run
    for cell in cells.values():
        runs = cell["runs"]
        assert len(runs) == 3 and cell["completed"] >= 3 and cell["errors"] == 0
        for name in ("rows_per_s", "p50_ms"):
            values = sorted(r[name] for r in runs)
            assert cell[name] == values[1] and cell["spread"][name] == [values[0], values[2]]
    assert cells["siam"]["vs_fastapi-onnx"] == pytest.approx(cells["siam"]["rows_per_s"]
                                                              / cells["fastapi-onnx"]["rows_per_s"])
    assert "rows/s min-max" in report.render_table(report.table_rows(results))


def test_combined_runs_add_their_counts_and_keep_any_error() -> None:
    def run(rows: float, errors: int = 0) -> dict:
        return {"system": "siam", "samples": 4, "concurrency": 8, "predictions_per_s": rows / 4, "rows_per_s": rows,
                "p50_ms": 1000 / rows, "p90_ms": 1.0, "p99_ms": 2.0, "max_ms": 3.0, "completed": 10,
                "errors": errors, "first_error": "HTTP 503" if errors else None, "mean_samples_used": None}

    assert report.combine_runs([run(100)]) == run(100)  # one run: as measured
    cell = report.combine_runs([run(300), run(100), run(200, errors=2), run(400)])
    assert cell["rows_per_s"] == 250 and cell["predictions_per_s"] == 62.5  # even count: the mean of the middle two
    assert cell["spread"]["rows_per_s"] == [100, 400] and cell["spread"]["p50_ms"] == [2.5, 10.0]
    assert cell["completed"] == 40 and cell["errors"] == 2 and cell["first_error"] == "HTTP 503"
    assert cell["mean_samples_used"] is None


def fake_results(siam_rows: float, litserve_rows: float, limit: float = 1000.0) -> dict:
    """A results dict shaped like the bench's, with chosen numbers."""
    def cell(system: str, samples: int, clients: int, rows: float, p50: float, p99: float) -> dict:
        return {"system": system, "samples": samples, "concurrency": clients, "rows_per_s": rows,
                "predictions_per_s": rows / samples, "p50_ms": p50, "p99_ms": p99}

    return {
        "limit": {"reference_rows_per_s": limit, "best": {"backend": "onnx"},
                  "backends": [{"backend": "onnx", "best_chunk": 256, "best_rows_per_s": limit},
                               {"backend": "torch", "best_chunk": 512, "best_rows_per_s": limit / 2}]},
        "engine": {"backend": "onnx", "concurrency": 64,
                   "results": [{"samples": 16, "concurrency": 64, "rows_per_s": 0.95 * limit,
                                "predictions_per_s": 0.95 * limit / 16, "p50_ms": 800, "p99_ms": 900}]},
        "http": {"systems": {"siam": {"runtime": {"backend": "onnx"}}}, "cells": [
            cell("siam", 16, 64, siam_rows, 900, 1000), cell("litserve", 16, 64, litserve_rows, 1800, 2500),
            cell("fastapi", 16, 64, 300, 3000, 6000), cell("siam", 16, 1, 100, 10, 12),
            cell("siam", 1, 1, 400, 2.2, 3), cell("fastapi", 1, 1, 300, 2.5, 3),
            cell("fastapi-onnx", 1, 1, 420, 2.0, 3),
        ]},
    }


def test_ratios_follow_the_measurements() -> None:
    results = fake_results(siam_rows=800, litserve_rows=400)
    report.add_ratios(results)
    siam = results["http"]["cells"][0]
    assert siam["ratio_to_limit"] == pytest.approx(0.8)
    assert siam["vs_litserve"] == pytest.approx(2.0)
    assert siam["vs_fastapi"] == pytest.approx(800 / 300)
    assert results["limit"]["backends"][1]["ratio_to_limit"] == pytest.approx(0.5)

    slower = fake_results(siam_rows=500, litserve_rows=400)
    report.add_ratios(slower)
    assert slower["http"]["cells"][0]["vs_litserve"] == pytest.approx(1.25)


@pytest.mark.parametrize(("ort_threads", "met"), [("auto", True), ("per-chunk", True), ("per-call", False)])
def test_a_service_sharing_its_threads_per_chunk_is_credited_with_that_limit(ort_threads: str, met: bool) -> None:
    """SIAM_ORT_THREADS=auto runs onnx the way onnx-per-chunk measures it: when that is the fastest limit,
    the default backend is the fastest; a per-call service is not."""
    results = fake_results(siam_rows=800, litserve_rows=400)
    results["limit"]["backends"].append({"backend": "onnx-per-chunk", "best_chunk": 64, "best_rows_per_s": 1100.0})
    results["limit"]["best"] = {"backend": "onnx-per-chunk"}
    results["http"]["systems"]["siam"]["runtime"]["ort_threads"] = ort_threads
    target = report.default_backend(results)
    assert target["met"] is met and target["value"] == pytest.approx(1.0 if met else 1000 / 1100)


def test_targets_are_judged_against_their_thresholds() -> None:
    results = fake_results(siam_rows=800, litserve_rows=400)
    report.add_ratios(results)
    targets = {t["target"]: t for t in report.evaluate_targets(results)}
    assert targets["engine rows/s at samples=16 / limit"]["met"] is True
    assert targets["HTTP rows/s, 64 clients, samples=16 / limit"]["met"] is True
    assert targets["HTTP rows/s, 64 clients, samples=16 / LitServe"]["value"] == pytest.approx(2.0)
    p99 = targets["HTTP p99, 64 clients, samples=16 / single-request latency"]
    assert p99["value"] == pytest.approx(100.0) and p99["met"] is False
    overhead = targets["samples=1 overhead vs the best plain FastAPI service (worst case)"]
    assert overhead["value"] == pytest.approx(0.10) and "p50 latency at 1 client vs fastapi-onnx" in overhead["detail"]
    assert targets["default backend's limit / fastest backend's limit"]["met"] is True

    missed = fake_results(siam_rows=500, litserve_rows=400)
    report.add_ratios(missed)
    targets = {t["target"]: t for t in report.evaluate_targets(missed)}
    assert targets["HTTP rows/s, 64 clients, samples=16 / limit"]["met"] is False
    assert targets["HTTP rows/s, 64 clients, samples=16 / LitServe"]["met"] is False
    table = report.render_table(report.table_rows(missed))
    assert "50%" in table and "1.25x" in table


def test_cells_too_long_for_the_window_are_skipped() -> None:
    assert rounds_fit(8, 256, limit=3000, duration=4)
    assert not rounds_fit(64, 256, limit=3000, duration=4)
    assert warmup_for(64, 64, limit=3000, floor=1.0, duration=4) == pytest.approx(1.5 * 64 * 64 / 3000)
    assert warmup_for(1, 1, limit=3000, floor=1.0, duration=4) == 1.0


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
])
def test_load_generator_reads_both_body_framings(raw: bytes) -> None:
    async def parse() -> tuple[int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw + b"HTTP/1.1 200 OK\r\n")  # the next response must be left unread
        return await read_response(reader)

    assert asyncio.run(parse()) == (200, b"hello")


def test_closed_loop_rate_does_not_jump_by_whole_rounds() -> None:
    # 64 clients answered together every 0.3 s: a 1 s window holds 3 or 4 rounds depending on its phase,
    # so "answers in the window / window" reads 192 or 256 per second; the spans read 64 / 0.3 either way.
    assert closed_loop_rate([(3, 0.9)] * 64) == pytest.approx(64 / 0.3)
    assert closed_loop_rate([(4, 1.2)] * 64) == pytest.approx(64 / 0.3)
    assert closed_loop_rate([(0, 0.0), (2, 0.5)]) == pytest.approx(4.0)  # a client with no answer adds nothing


def test_latency_of_one_prediction_per_m_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import latency
    from tests.conftest import make_model

    model, spec = make_model()
    save_checkpoint(tmp_path / "tiny", model, spec, name="tiny")
    out = tmp_path / "latency.json"
    latency.main([str(tmp_path / "tiny"), "--samples", "1,8", "--repeats", "3", "--threads", "1",
                  "--onnx-cache", str(tmp_path / "onnx"), "--output", str(out)])
    result = json.loads(out.read_text())
    row = result["results"][0]
    assert row["model"] == "tiny" and row["backend"] == "onnx" and set(row["ms"]) == {"1", "8"}
    assert row["ms"]["1"] > 0 and row["ms"]["8"] > 0
    assert "| `tiny` | onnx |" in capsys.readouterr().out and result["command"].startswith("python -m benchmarks")


def test_the_bare_graph_is_the_network_without_its_noise(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    from models.checkpoint import load_checkpoint
    from models.onnx import export_onnx

    model, manifest = load_checkpoint(tiny_checkpoint, "cpu")
    path = export_onnx(model, manifest.spec, tmp_path / "bare.onnx", noise=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    x = torch.rand(4, 3, 32, 32)
    (logits,) = session.run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        assert np.allclose(logits, model(x).numpy(), atol=1e-4)  # twice the same: no noise drawn
        assert np.array_equal(logits, session.run(["logits"], {"images": x.numpy()})[0])


@pytest.mark.subprocess
@pytest.mark.timeout(180)
def test_startup_benchmark_times_first_and_later_starts(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from benchmarks.startup import main as startup_main

    out = tmp_path / "startup.json"
    results = startup_main([str(tiny_checkpoint), "--repeats", "1", "--serve-args", "--threads 1",
                            "--output", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    for kind in ("first_start", "later_start"):
        assert 0 < results[kind]["median_s"] < 120 and len(results[kind]["runs_s"]) == 1


def test_ort_spin_cells_parse_as_samples_by_clients() -> None:
    from benchmarks.ort_spin import parse_cells

    assert parse_cells("16x64,1x1") == [(16, 64), (1, 1)]
    with pytest.raises(ValueError):
        parse_cells("16")


def test_asgi_overhead_times_predict_through_the_whole_app(tiny_checkpoint: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.asgi_overhead import main as overhead_main

    overhead_main([str(tiny_checkpoint), "--samples", "2", "--requests", "20", "--warmup", "2", "--threads", "1",
                   "--backend", "torch"])
    out = capsys.readouterr().out
    assert out.startswith("command: python -m benchmarks.asgi_overhead ")
    median = re.search(r"/predict\?samples=2 in-process, 20 requests: median (\d+) us", out)
    assert median is not None and 0 < int(median.group(1)) < 5_000_000, out
    loop_cpu = re.search(r"event loop CPU (\d+) us a request", out)  # the HTTP side's own share of it
    assert loop_cpu is not None and 0 < int(loop_cpu.group(1)) < 5_000_000, out


def test_every_item_takes_every_place_once_over_as_many_rounds() -> None:
    """Repeated measurements rotate their order (``report.in_turn``): the first place after a start lags."""
    items = ["siam", "fastapi-onnx", "litserve", "instant"]
    orders = [report.in_turn(items, r) for r in range(len(items))]
    assert all(sorted(order) == sorted(items) for order in orders)
    for place in range(len(items)):
        assert sorted(order[place] for order in orders) == sorted(items)
    assert report.in_turn(items, len(items)) == items and report.in_turn([], 3) == []


def test_repeated_limits_keep_each_chunks_median_and_every_runs_best() -> None:
    from benchmarks.limit import BackendLimit, median_limit

    runs = [BackendLimit("onnx", "CPUExecutionProvider", {64: 100.0, 256: 300.0}, 256, 300.0),
            BackendLimit("onnx", "CPUExecutionProvider", {64: 200.0, 256: 100.0}, 64, 200.0),
            BackendLimit("onnx", "CPUExecutionProvider", {64: 150.0, 256: 250.0}, 256, 250.0)]
    combined = median_limit(runs)
    assert combined.rates == {64: 150.0, 256: 250.0}
    assert (combined.best_chunk, combined.best_rows_per_s) == (256, 250.0)
    assert combined.runs_rows_per_s == [300.0, 200.0, 250.0]
    assert median_limit(runs[:1]) is runs[0]
    failed = BackendLimit("onnx", "-", {}, 0, 0.0, "RuntimeError: no graph")
    assert median_limit([runs[0], failed]) is failed  # a failure is said, not averaged away


def test_per_chunk_limit_counts_the_chunk_of_every_thread(tiny_checkpoint: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """onnx-per-chunk runs one chunk on each of the threads at once: a round is chunk x threads rows."""
    from benchmarks import limit

    seen: list[int] = []
    measure = limit.rows_per_second

    def spy(run: Any, rows: int, budget_s: float, sync: Any) -> float:
        seen.append(rows)
        return measure(run, rows, budget_s, sync)

    monkeypatch.setattr(limit, "rows_per_second", spy)
    threads = torch.get_num_threads()
    try:
        found = limit.measure_limits(tiny_checkpoint, torch.device("cpu"), 2, ["onnx-per-chunk", "onnx"], [8, 16],
                                     0.05, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert [f.error for f in found] == [None, None] and all(f.best_rows_per_s > 0 for f in found)
    assert seen == [16, 32, 8, 16]


def test_threads_by_rows_times_both_ways_of_sharing_the_threads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from benchmarks import threads_by_rows

    threads = torch.get_num_threads()
    try:
        results = threads_by_rows.main([str(tiny_checkpoint), "--rows", "1,4", "--rounds", "2", "--row-budget", "8",
                                        "--output", str(tmp_path / "t.json")])
        with pytest.raises(SystemExit):
            threads_by_rows.main([str(tiny_checkpoint), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "t.json").read_text())["table"] == results["table"]
    assert [row["rows"] for row in results["table"]] == [1, 4]
    for row in results["table"]:
        assert all(len(row["runs_ms"][mode]) == 2 and row["ms"][mode] > 0 for mode in ("per-call", "per-chunk"))
        assert row["per_chunk_over_per_call"] == pytest.approx(row["ms"]["per-chunk"] / row["ms"]["per-call"])


def test_bench_refuses_gpu_options_it_cannot_honour(tiny_checkpoint: Path) -> None:
    with pytest.raises(SystemExit, match="--service-backend torch"):
        bench_main(["--checkpoint", str(tiny_checkpoint), "--cuda-graphs", "true"])
    with pytest.raises(SystemExit, match="at most --workers"):
        bench_main(["--checkpoint", str(tiny_checkpoint), "--workers", "2", "--model-processes", "3"])


def test_an_output_it_cannot_write_is_refused_before_anything_is_measured(
        tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=f"^siam bench: cannot write --output {blocker}/x.json: "):
        bench_main(["--quick", "--checkpoint", str(tiny_checkpoint), "--output", str(blocker / "x.json")])
    assert "1. the limit" not in capsys.readouterr().out
    assert blocker.is_file()


def test_without_output_it_writes_under_runs_never_over_the_committed_results(
        tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("")  # a file where the folder would go: the default output is refused by name
    with pytest.raises(SystemExit, match=r"cannot write --output runs/bench/cpu-\d+cores\.json: "):
        bench_main(["--quick", "--checkpoint", str(tiny_checkpoint), "--device", "cpu"])


def test_gpu_paths_times_the_eager_forward_and_engine_and_refuses_graphs_off_a_gpu(tiny_checkpoint: Path,
                                                                                  tmp_path: Path) -> None:
    from benchmarks import gpu_paths

    threads = torch.get_num_threads()
    try:
        results = gpu_paths.main([str(tiny_checkpoint), "--device", "cpu", "--variants", "eager", "--rows", "1,8",
                                  "--samples", "2", "--callers", "4", "--duration", "0.3", "--rounds", "2",
                                  "--call-rows", "40", "--tuning-cache", str(tmp_path / "tc.json"),
                                  "--output", str(tmp_path / "g.json")])
        with pytest.raises(SystemExit):
            gpu_paths.main([str(tiny_checkpoint), "--device", "cpu", "--variants", "eager,graphs"])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "g.json").read_text())["forward"] == results["forward"]
    assert [row["rows"] for row in results["forward"]] == [1, 8]
    assert all(len(row["runs_ms"]["eager"]) == 2 and row["ms"]["eager"] > 0 for row in results["forward"])
    assert results["engine"][0]["samples"] == 2 and results["engine"][0]["predictions_per_s"]["eager"] > 0


def test_engine_overhead_counts_answers_of_a_model_that_costs_nothing(tmp_path: Path) -> None:
    from benchmarks import engine_overhead

    results = engine_overhead.main(["--samples", "1,4", "--callers", "8", "--duration", "0.3", "--rounds", "2",
                                    "--output", str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text())["table"] == results["table"]
    assert [row["samples"] for row in results["table"]] == [1, 4]
    for row in results["table"]:
        assert len(row["runs"]) == 2 and row["predictions_per_s"] > 100
        assert row["us_per_request"] == pytest.approx(1e6 / row["predictions_per_s"])


def test_the_default_limit_sweep_reaches_2048_rows_on_a_gpu_only() -> None:
    default = [16, 32, 1024]
    assert limit_chunks(default, torch.device("cuda"), given=False) == [16, 32, 1024, 2048]
    assert limit_chunks(default, torch.device("cpu"), given=False) == default
    assert limit_chunks([64], torch.device("cuda"), given=True) == [64]  # --chunks (or --quick) is kept


def test_model_process_overhead_answers_through_the_socket() -> None:
    from benchmarks import model_process_overhead

    results = model_process_overhead.main(["--clients", "1", "--callers", "4", "--samples", "2", "--duration",
                                           "0.5", "--rounds", "1"])
    (row,) = results["table"]
    assert (row["samples"], row["clients"], row["callers"]) == (2, 1, 4)
    assert row["requests_per_s"] > 50 and row["runs"] == [row["requests_per_s"]]


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads Linux's /proc")
def test_cpu_share_splits_the_servers_cpu_and_the_idle_time_per_checkout(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from benchmarks import cpu_share

    out = tmp_path / "share.json"
    shares = cpu_share.main([str(tiny_checkpoint), "--samples", "4", "--concurrency", "4", "--duration", "1",
                             "--rounds", "2", "--threads", "1", "--backend", "torch", "--output", str(out)])
    assert len(shares) == 2 and all(s.checkout == str(Path(cpu_share.__file__).resolve().parents[1]) for s in shares)
    for share in shares:
        assert share.rows_per_s > 0 and share.p50_ms > 0
        assert 0 < share.event_loop_cores <= 1.05  # one thread: at most one core, plus tick rounding
        assert share.other_threads_cores > 0  # the model's thread computed the copies
        assert 0 <= share.idle_share <= 1
    written = json.loads(out.read_text())
    assert len(written["rounds"]) == 2 and list(written["commits"]) == [shares[0].checkout]


def test_gil_handoff_times_each_operation_alone_and_beside_a_busy_thread(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.gil_handoff import main as handoff_main
    from benchmarks.gil_handoff import operations

    handoff_main(["--calls", "3"])
    out = capsys.readouterr().out
    assert out.startswith("command: python -m benchmarks.gil_handoff --calls 3\n") and "switch interval" in out
    rows = out.splitlines()[3:]
    assert len(rows) == len(operations())  # one row per operation, with both times in microseconds
    assert all(row.startswith(name) and row.count(" us") == 2 for name, row in zip(operations(), rows, strict=True))
    assert not any(t.name == "gil-handoff-busy" for t in threading.enumerate())  # the busy thread stopped


def test_the_restart_drill_loses_no_image_through_a_killed_model_process_and_worker(tmp_path: Path) -> None:
    """The drill behind docs/api.md's "lost none of 2,000 images through three kills", made small; every answer
    of the run with kills takes its feedback after them, and the first run's answers, which had theirs before
    the kills, are refused a second (the feedback file outlives the killed model process)."""
    from benchmarks import restart_drill

    if not restart_drill.ARCHIVE.is_file():
        pytest.skip(f"needs the CIFAR-10 archive at {restart_drill.ARCHIVE}")
    out = tmp_path / "drill.json"
    restart_drill.main(["--images", "96", "--kills", "model@0.2,http@1.5", "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["drill"]["answered"] == 96 and result["drill"]["lost"] == 0, result["drill"]
    assert [k["kind"] for k in result["kills"]] == ["model", "http"]
    assert all(k["during_run"] for k in result["kills"]), result["kills"]  # each kill landed while it ran
    assert result["refused_during_drill"].get("not_ready", 0) >= 1  # felt by the clients, and retried
    before = result["feedback_before_kills"]
    assert before["sent"] == 96 and before["accepted"] == 96, before
    feedback = result["feedback_after_kills"]  # answers from before each kill still take their feedback
    assert feedback["sent"] == 96 and feedback["accepted"] == 96, feedback
    assert 0.0 < feedback["accuracy_from_feedback"] < 1.0
    again = result["feedback_again_after_kills"]
    assert again["sent"] == 96 and again["accepted"] == 0 and again["refused"] == 96, again
