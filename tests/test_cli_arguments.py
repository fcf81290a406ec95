"""Counts and durations on every command line are refused when the line is read, naming the flag: before,
`siam evaluate --images -5` evaluated all but the last five test images for hours, `--images 0` and
`siam bench --duration 0` or `--samples 0,16` and `siam predict --retries -1` ended in tracebacks, and
`siam export --canary -1` passed. And the long runs refuse an output they could not write before they
start, not after hours of work."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks import bench, restart_drill
from models.cli_types import unwritable
from service import client
from training import evaluate, export, report, sequential_eval, train

Parser = Callable[[], argparse.ArgumentParser]

REFUSED: list[tuple[Parser, list[str], str]] = [
    (evaluate.build_parser, ["ckpt", "--images", "-5"], "argument --images: must be >= 1, got -5"),
    (evaluate.build_parser, ["ckpt", "--images", "0"], "argument --images: must be >= 1, got 0"),
    (evaluate.build_parser, ["ckpt", "--eot", "0"], "argument --eot: must be >= 1, got 0"),
    (evaluate.build_parser, ["ckpt", "--restarts", "0"], "argument --restarts: must be >= 1, got 0"),
    (evaluate.build_parser, ["ckpt", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (evaluate.build_parser, ["ckpt", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (evaluate.build_parser, ["ckpt", "--samples", "1,0"], "argument --samples: must be >= 1, got 0"),
    (sequential_eval.build_parser, ["ckpt", "--images", "0"], "argument --images: must be >= 1, got 0"),
    (sequential_eval.build_parser, ["ckpt", "--budget", "0"], "argument --budget: must be >= 1, got 0"),
    (report.build_parser, ["--apgd-steps", "-1"], "argument --apgd-steps: must be >= 0, got -1"),
    (report.build_parser, ["--certify-n", "0"], "argument --certify-n: must be >= 1, got 0"),
    (report.build_parser, ["--eot", "0"], "argument --eot: must be >= 1, got 0"),
    (export.build_parser, ["ckpt", "--canary", "-1"], "argument --canary: must be >= 0, got -1"),
    (restart_drill.build_parser, ["--images", "0"], "argument --images: must be >= 1, got 0"),
    (restart_drill.build_parser, ["--concurrency", "0"], "argument --concurrency: must be >= 1, got 0"),
    (train.build_parser, ["--train-images", "0"], "argument --train-images: must be >= 1, got 0"),
    (train.build_parser, ["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (train.build_parser, ["--train-samples", "0"], "argument --train-samples: must be >= 1, got 0"),
    (train.build_parser, ["--eval-images", "-5"], "argument --eval-images: must be >= 0, got -5"),
    (report.build_parser, ["--test-images", "-5"], "argument --test-images: must be >= 0, got -5"),
    (train.build_parser, ["--sigma", "-0.1"], "argument --sigma: must be >= 0, got -0.1"),
    (train.build_parser, ["--sigma", "nan"], "argument --sigma: must be >= 0, got nan"),
    (train.build_parser, ["--lr", "-1"], "argument --lr: must be >= 0, got -1"),
    (evaluate.build_parser, ["ckpt", "--eps", "-0.03"], "argument --eps: must be >= 0, got -0.03"),
    (bench.build_parser, ["--duration", "0"], "argument --duration: must be > 0, got 0"),
    (bench.build_parser, ["--limit-budget", "-1"], "argument --limit-budget: must be > 0, got -1"),
    (bench.build_parser, ["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (bench.build_parser, ["--samples", "0,16"], "argument --samples: must be >= 1, got 0"),
    (bench.build_parser, ["--concurrency", ","], "argument --concurrency: needs at least one value"),
    (bench.build_parser, ["--model-processes", "0"], "argument --model-processes: must be >= 1, got 0"),
    (bench.build_parser, ["--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (bench.build_parser, ["--confidence", "1"], "argument --confidence: must be above 0.5 and below 1, got 1"),
    (evaluate.build_parser, ["ckpt", "--alpha", "0"], "argument --alpha: must be between 0 and 1 (exclusive), got 0"),
    (report.build_parser, ["--certify-alpha", "1.5"],
     "argument --certify-alpha: must be between 0 and 1 (exclusive), got 1.5"),
    (sequential_eval.build_parser, ["ckpt", "--confidence", "0.3"],
     "argument --confidence: must be above 0.5 and below 1, got 0.3"),
    (report.build_parser, ["--sequential-confidence", "0.3"],
     "argument --sequential-confidence: must be above 0.5 and below 1, got 0.3"),
]


@pytest.mark.parametrize(("parser", "argv", "message"), REFUSED,
                         ids=[f"{p.__module__.rsplit('.', 1)[-1]}:{' '.join(a)}" for p, a, _ in REFUSED])
def test_a_count_below_its_bound_is_refused_with_the_flag_named(parser: Parser, argv: list[str], message: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        parser().parse_args(argv)
    assert refused.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--retries", "-1"], "argument --retries: must be >= 0, got -1"),
    (["--concurrency", "0"], "argument --concurrency: must be >= 1, got 0"),
    (["--timeout", "0"], "argument --timeout: must be > 0, got 0.0"),
    (["--samples", "0"], "argument --samples: must be >= 1, got 0"),
])
def test_the_client_refuses_its_counts_below_their_bound_before_sending(argv: list[str], message: str,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        client.main(["a.png", "--url", "http://127.0.0.1:1", *argv])
    assert refused.value.code == 2
    assert message in capsys.readouterr().err


def test_the_bounds_admit_their_smallest_values() -> None:
    assert evaluate.build_parser().parse_args(["ckpt", "--images", "1", "--eot", "1"]).images == 1
    assert export.build_parser().parse_args(["ckpt", "--canary", "0"]).canary == 0
    assert report.build_parser().parse_args(["--apgd-steps", "0"]).apgd_steps == 0  # 0: no APGD
    assert report.build_parser().parse_args(["--sequential-confidence", "0"]).sequential_confidence == 0  # 0: skip
    assert train.build_parser().parse_args(["--val-images", "0", "--eval-attack-images", "0"]).val_images == 0
    assert sequential_eval.build_parser().parse_args(["ckpt", "--attacked-images", "0"]).attacked_images == 0
    assert train.build_parser().parse_args(["--sigma", "0", "--lr", "0"]).lr == 0  # lr 0: a fine-tune test's
    args = bench.build_parser().parse_args(["--duration", "0.5", "--samples", "1,16", "--model-processes", "1,2",
                                            "--warmup", "0", "--confidence", "0.999"])
    assert (args.duration, args.samples, args.model_processes, args.confidence) == (0.5, [1, 16], [1, 2], 0.999)


def test_an_output_folder_is_judged_without_creating_anything(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert unwritable(tmp_path) is None
    assert unwritable(tmp_path / "new" / "deeper") is None
    assert not (tmp_path / "new").exists()  # judged from the nearest folder that exists, and nothing made
    assert unwritable(blocker) == f"{blocker} is a file, not a folder"
    assert unwritable(blocker / "eval") == f"{blocker} is a file, not a folder"
    assert sorted(tmp_path.iterdir()) == [blocker]  # the probe's temporary file is gone


@pytest.mark.parametrize("command, prefix", [
    (evaluate.main, "siam evaluate: cannot write the results to"),
    (sequential_eval.main, "siam evaluate --sequential: cannot write the results to"),
    (lambda argv: train.main(["--output", argv[2]]), "siam train: cannot write the checkpoint to"),
])
def test_an_evaluation_refuses_an_output_it_cannot_write_before_it_starts(
        command: Callable[[list[str]], None], prefix: str, tmp_path: Path) -> None:
    """Before any checkpoint or data loads: the checkpoint named here does not even exist."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=f"^{prefix} {blocker}/eval: {blocker} is a file, not a folder$"):
        command([str(tmp_path / "no-checkpoint"), "--output", str(blocker / "eval")])


def test_the_report_refuses_an_output_it_cannot_write_before_it_starts(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=f"^siam evaluate --report: cannot write the report to {blocker}/r: "):
        report.main([str(tmp_path / "no-checkpoint"), "--quick", "--output", str(blocker / "r")])
