"""What ``siam evaluate --sequential`` reports: each kind of image (clean, attacked, stalling) answered both
ways and scored against its own labels, the attacks made with the settings given on the images they name,
each path timed on its own clock.

The end-to-end test in test_sequential.py checks only the report's shape (copies within the budget, shares
between 0 and 1). Here a scripted smoothed classifier answers from a table keyed by an id written into each
image, so every figure of the report is computed in the test as well."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from models.checkpoint import read_manifest
from models.smooth import Prediction
from training import sequential_eval as seq
from training.attacks import cross_entropy, undecided
from training.data import load_split, to_float
from training.measure import clopper_pearson

N, BATCH, ATTACKED, STALLING = 10, 4, 6, 3
BUDGET, CONFIDENCE = 64, 0.99
ATTACK = {"eps": 3 / 255, "step": 1 / 255, "steps": 5, "soft_output_copies": 7}
SHIFT = {"clean": 0, "attacked": 100, "stalling": 200}  # the id an attack gives image i: i + SHIFT[kind]
COST = {"clean": 0.01, "attacked": 0.02, "stalling": 0.04}  # clock seconds per image, sequentially; fixed: 3x


def answers_for(ident: int) -> tuple[int, int, bool, int]:
    """The scripted (sequential label, copies used, decided, fixed-budget label) of the image with id
    ``ident``: labels that are right for some images and not others, and that differ between the two paths
    and between an image and its attacked versions; every stalled image undecided."""
    i, kind = ident % 100, ("clean", "attacked", "stalling")[ident // 100]
    if kind == "stalling":
        return (i + 1) % 10, BUDGET, False, i % 10
    label = (i * 3 + ident // 100) % 10
    used = (16, 32, 64)[(i + ident // 100) % 3]
    return label, used, used < BUDGET, label if i % 4 else (label + 5) % 10


def ids_of(images: torch.Tensor) -> list[int]:
    return [round(float(v) * 1000) for v in images[:, 0, 0, 0]]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class ScriptedSmooth:
    """Answers from :func:`answers_for`, advancing ``clock`` by each image's cost."""

    def __init__(self, clock: Clock):
        self.clock, self.calls = clock, []

    def cost(self, images: torch.Tensor) -> float:
        return sum(COST[("clean", "attacked", "stalling")[i // 100]] for i in ids_of(images))

    def predict_sequential(self, images: torch.Tensor, budget: int, confidence: float) -> list[tuple[Prediction, bool]]:
        self.calls.append(("sequential", budget, confidence))
        self.clock.now += self.cost(images)
        return [(Prediction(label, [], 0.0, used), decided)
                for label, used, decided, _ in map(answers_for, ids_of(images))]

    def predict_batch(self, images: torch.Tensor, samples: int) -> list[Prediction]:
        self.calls.append(("fixed", samples, None))
        self.clock.now += 3 * self.cost(images)
        return [Prediction(fixed, [], 0.0, samples) for *_, fixed in map(answers_for, ids_of(images))]


class Bar:
    def __init__(self) -> None:
        self.n = 0

    def update(self, k: int) -> None:
        self.n += k


def run_scripted(monkeypatch: pytest.MonkeyPatch, attacked: int = ATTACKED,
                 stalling: int | None = STALLING) -> tuple[dict[str, Any], list[dict[str, Any]], ScriptedSmooth]:
    """run_sequential on N scripted images with the attacks replaced by spies that give each attacked image
    the id its kind names (``stalling`` None: run_sequential's default); returns the results, the attack
    calls and the classifier."""
    clock = Clock()
    smooth = ScriptedSmooth(clock)
    calls: list[dict[str, Any]] = []
    soft = object()

    def smoothed_log_probs(s: Any, samples: int) -> object:
        assert s is smooth
        calls.append({"soft_output_copies": samples})
        return soft

    def pgd(f: object, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, steps: int,
            loss: Any) -> torch.Tensor:
        kind = "attacked" if loss is cross_entropy else "stalling" if loss is undecided else "?"
        calls.append({"f": f is soft, "ids": ids_of(x), "y": y.tolist(), "eps": eps, "step": step, "steps": steps,
                      "kind": kind})
        out = x.clone()
        out[:, 0, 0, 0] += SHIFT[kind] / 1000
        return out

    monkeypatch.setattr(seq, "smoothed_log_probs", smoothed_log_probs)
    monkeypatch.setattr(seq, "pgd", pgd)
    monkeypatch.setattr(seq, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    x = torch.zeros(N, 3, 2, 2)
    x[:, 0, 0, 0] = torch.arange(N) / 1000
    y = torch.tensor([(i * 7) % 10 for i in range(N)])
    bar = Bar()
    more = {} if stalling is None else {"stalling_images": stalling}
    results = seq.run_sequential(smooth, x, y, BUDGET, CONFIDENCE, ATTACK, attacked, BATCH, bar, **more)  # type: ignore[arg-type]
    assert bar.n == N + attacked + (stalling or 0)
    return results, calls, smooth


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], list[dict[str, Any]], ScriptedSmooth]:
    return run_scripted(monkeypatch)


def expected(kind: str, count: int) -> dict[str, Any]:
    """The results for the first ``count`` images of ``kind``, from the script and the labels alone."""
    truth = [(i * 7) % 10 for i in range(count)]
    rows = [answers_for(i + SHIFT[kind]) for i in range(count)]
    labels, used, decided, fixed = (list(column) for column in zip(*rows, strict=True))

    def share(flags: list[bool]) -> dict[str, Any]:
        return {"value": sum(flags) / len(flags), "ci95": list(clopper_pearson(sum(flags), len(flags)))}

    def summary(values: list[int]) -> dict[str, float]:
        a = np.array(values, dtype=float)
        return {"mean": a.mean(), "p50": np.quantile(a, 0.5), "p95": np.quantile(a, 0.95), "max": a.max()}

    kept = [u for u, d in zip(used, decided, strict=True) if d]
    return {
        "images": count, "copies_used": summary(used), "copies_used_decided": summary(kept) if kept else None,
        "copies_used_all": used, "decided": share(decided),
        "agreement_with_fixed": share([a == b for a, b in zip(labels, fixed, strict=True)]),
        "accuracy_sequential": share([a == t for a, t in zip(labels, truth, strict=True)]),
        "accuracy_fixed": share([a == t for a, t in zip(fixed, truth, strict=True)]),
        "images_per_s": {"sequential": 1 / COST[kind], "fixed": 1 / (3 * COST[kind])},
    }


def test_each_kind_is_answered_both_ways_and_scored_against_its_own_labels(scripted: Any) -> None:
    results, _, smooth = scripted
    assert list(results) == ["clean", "attacked", "stalling"]
    for kind, count in (("clean", N), ("attacked", ATTACKED), ("stalling", STALLING)):
        got, want = results[kind], expected(kind, count)
        assert set(got) == set(want), kind
        for key, value in want.items():
            assert got[key] == pytest.approx(value), (kind, key, got[key], value)
    # the script was built so that these figures tell the paths and the kinds apart
    assert results["clean"]["accuracy_sequential"]["value"] != results["clean"]["accuracy_fixed"]["value"]
    assert 0 < results["clean"]["agreement_with_fixed"]["value"] < 1
    assert results["clean"]["copies_used_decided"] != results["clean"]["copies_used"]
    assert results["stalling"]["copies_used_decided"] is None  # none of them decided
    assert {call[1:] for call in smooth.calls} == {(BUDGET, CONFIDENCE), (BUDGET, None)}


def test_a_kind_with_no_images_is_left_out_and_the_next_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """--attacked-images 0 with stalling images: the stalling row is still reported; no stalling unless
    asked."""
    results, calls, _ = run_scripted(monkeypatch, attacked=0, stalling=2)
    assert list(results) == ["clean", "stalling"] and [c["kind"] for c in calls[1:]] == ["stalling"]
    assert results["stalling"]["accuracy_fixed"] == pytest.approx(expected("stalling", 2)["accuracy_fixed"])
    results, calls, _ = run_scripted(monkeypatch, attacked=3, stalling=None)
    assert list(results) == ["clean", "attacked"] and [c["kind"] for c in calls[1:]] == ["attacked"]


def test_the_attacks_run_on_the_images_and_labels_they_name_with_the_settings_given(scripted: Any) -> None:
    """The first ATTACKED images attacked by cross-entropy and the first STALLING at the stopping rule, batch
    by batch, on the adaptive attack's smoothed output of ``soft_output_copies`` copies."""
    _, calls, _ = scripted
    assert calls[0] == {"soft_output_copies": ATTACK["soft_output_copies"]}
    made = [(c["kind"], c["ids"], c["y"]) for c in calls[1:]]
    assert made == [("attacked", [0, 1, 2, 3], [0, 7, 4, 1]), ("stalling", [0, 1, 2], [0, 7, 4]),
                    ("attacked", [4, 5], [8, 5])]
    assert all((c["f"], c["eps"], c["step"], c["steps"]) == (True, ATTACK["eps"], ATTACK["step"], ATTACK["steps"])
               for c in calls[1:])


def test_evaluate_sequential_reads_the_subset_and_passes_every_setting_on(
        tiny_cifar_tar: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def run_sequential(smooth: Any, x: torch.Tensor, y: torch.Tensor, budget: int, confidence: float,
                       attack: dict[str, Any], attacked: int, batch_size: int, bar: Any,
                       stalling: int) -> dict[str, Any]:
        seen.update(x=x, y=y, budget=budget, confidence=confidence, attack=attack, attacked=attacked,
                    batch_size=batch_size, stalling=stalling, sigma=smooth.smoothing.sigma,
                    classes=smooth.num_classes, bar=bar)
        return {"clean": "results"}

    bars: list[dict[str, Any]] = []

    class Progress(Bar):
        def __init__(self, **kw: Any):
            super().__init__()
            bars.append(kw)

        def __enter__(self) -> Progress:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(seq, "run_sequential", run_sequential)
    monkeypatch.setattr(seq, "tqdm", Progress)
    argv = [str(tiny_checkpoint), "--sequential", "--data", str(tiny_cifar_tar), "--cache-dir", str(tmp_path / "cache"),
            "--images", "12", "--attacked-images", "5", "--stalling-images", "50", "--budget", "48",
            "--confidence", "0.95", "--eps", "0.01", "--step", "0.004", "--steps", "3", "--adaptive-samples", "6",
            "--batch-size", "7", "--seed", "3", "--threads", "1"]
    monkeypatch.setattr("sys.argv", ["siam", "evaluate", *argv])
    args = seq.build_parser().parse_args([a for a in argv if a != "--sequential"])
    report = seq.evaluate_sequential(args)
    assert report["command"] == "siam evaluate " + " ".join(argv)
    assert bars == [{"total": 12 + 5 + 12, "desc": "sequential", "unit": "img", "dynamic_ncols": True}]
    assert isinstance(seen.pop("bar"), Progress)
    test = load_split(str(tiny_cifar_tar), "test", str(tmp_path / "cache")).subset(12, seed=3)
    assert torch.equal(seen.pop("x"), to_float(test.images)) and torch.equal(seen.pop("y"), test.labels)
    attack = {"name": "adaptive", "norm": "Linf", "eps": 0.01, "step": 0.004, "steps": 3, "soft_output_copies": 6}
    assert seen == {"budget": 48, "confidence": 0.95, "attack": attack, "attacked": 5, "batch_size": 7,
                    "stalling": 12, "sigma": 0.25, "classes": 10}  # stalling: at most every image
    assert report["results"] == {"clean": "results"} and report["attack"] == attack
    assert (report["budget"], report["confidence"], report["model"]) == (48, 0.95, "tiny")
    assert report["data"] == {"source": test.source, "sha256": test.checksum, "images": 12, "subset_seed": 3}
    assert report["smoothing"]["sigma"] == 0.25
    assert report["weights_sha256"] == read_manifest(tiny_checkpoint).weights.sha256
    assert set(report["machine"]) == {"device", "platform", "threads", "torch"} and report["machine"]["threads"] == 1
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"] == torch.__version__
    monkeypatch.setattr("sys.argv", ["python", "-m", "training.sequential_eval", *argv[:1]])  # run as a module
    args = seq.build_parser().parse_args([*argv[:1], "--data", str(tiny_cifar_tar), "--images", "4"])
    assert seq.evaluate_sequential(args)["command"] == "siam evaluate -m training.sequential_eval " + argv[0]


def test_help_names_the_command_says_what_it_measures_and_gives_the_defaults() -> None:
    text = seq.build_parser().format_help()
    assert text.startswith("usage: siam evaluate --sequential [-h]")
    assert seq.__doc__.split("\n\n")[1] in text  # the description, its line breaks kept
    for option, words in (("checkpoint", "checkpoint folder"), ("--images IMAGES", "clean test images (default: 1000)"),
                          ("--attacked-images ATTACKED_IMAGES", "of those, how many are also attacked (default: 500)"),
                          ("--stalling-images STALLING_IMAGES", "of those, how many are also attacked at the stopping "
                           "rule: PGD that levels the top two classes so that the vote stays undecided (default: 0)"),
                          ("--budget BUDGET", "the most copies an image may use (default: 256)"),
                          ("--confidence CONFIDENCE", "stopping confidence (default: 0.999)"),
                          ("--adaptive-samples ADAPTIVE_SAMPLES", "copies in the attack's soft output"),
                          ("--seed SEED", "seeds the subset, the attack and the noise"),
                          ("--output OUTPUT", "output folder (default: <checkpoint>/eval/sequential)")):
        start = text.index(f"\n  {option}")
        end = re.compile(r"\n(\n|  [-\w])|$").search(text, start + 3)  # the next option, or the section's end
        assert end is not None and " ".join(text[start:end.start()].split()) == f"{option} {words}", text[start:]


def test_the_defaults_are_the_papers_attack_and_a_budget_of_256() -> None:
    args = vars(seq.build_parser().parse_args(["ckpt"]))
    assert args == {"checkpoint": "ckpt", "data": args["data"], "cache_dir": args["cache_dir"], "images": 1000,
                    "attacked_images": 500, "stalling_images": 0, "budget": 256, "confidence": 0.999, "eps": 8 / 255,
                    "step": 2 / 255, "steps": 7, "adaptive_samples": 8, "batch_size": 100, "device": "auto",
                    "threads": None, "seed": 0, "output": None}


REPORT = {"model": "tiny", "budget": 64, "confidence": 0.99, "command": "siam evaluate ckpt --sequential",
          "machine": {"device": "cpu", "threads": 2}, "attack": {"steps": 7, "soft_output_copies": 8, "eps": 8 / 255},
          "results": {"clean": {"images": 20, "copies_used": {"mean": 21.25, "p50": 16.0, "p95": 63.6, "max": 64.0},
                                "copies_used_all": [16] * 17 + [32, 64, 64],
                                "decided": {"value": 0.9, "ci95": [0.7, 0.95]},
                                "agreement_with_fixed": {"value": 1.0, "ci95": [0.85, 1.0]},
                                "accuracy_sequential": {"value": 0.55, "ci95": [0.32, 0.77]},
                                "accuracy_fixed": {"value": 0.5, "ci95": [0.27, 0.73]},
                                "images_per_s": {"sequential": 30.0, "fixed": 12.0}}}}


def test_the_table_prints_each_figure_of_the_results() -> None:
    markdown = seq.to_markdown(REPORT)
    lines = markdown.splitlines()
    assert lines[:5] == [
        "### tiny: sequential sampling, budget 64, confidence 0.99", "",
        "`siam evaluate ckpt --sequential` (cpu, 2 threads). Attacked: adaptive PGD-7 on the log mean softmax "
        "of 8 copies, L-inf 8/255.", "",
        "| images | n | copies used: mean / p50 / p95 / max | decided | agrees with fixed | accuracy, sequential "
        "| accuracy, fixed | images/s, sequential / fixed |"]
    assert lines[5] == "|---|---|---|---|---|---|---|---|" and len(lines) == 7 and markdown.endswith("|\n")
    wide = {**REPORT, "attack": {**REPORT["attack"], "eps": 200 / 255}}
    assert "L-inf 200/255." in seq.to_markdown(wide)
    assert markdown.splitlines()[-1] == ("| clean | 20 | 21.2 / 16 / 64 / 64 | 90.0 [70.0, 95.0] | 100.0 [85.0, 100.0] "
                                         "| 55.0 [32.0, 77.0] | 50.0 [27.0, 73.0] | 30.0 / 12.0 (2.5x) |")
    stalled = {**REPORT, "results": {**REPORT["results"], "stalling": REPORT["results"]["clean"]}}
    assert (" Stalling: the same PGD maximising minus the gap between the top two classes (aimed at the stopping "
            "rule: a close vote spends the whole budget).\n") in seq.to_markdown(stalled)
    assert seq.to_markdown(stalled).splitlines()[-1].startswith("| stalling | 20 |")


def test_the_plot_bins_copies_by_the_round_they_ended(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from matplotlib.axes import Axes

    drawn: list[tuple[list[int], list[float], dict[str, Any]]] = []
    axes: list[Axes] = []
    hist = Axes.hist

    def spy(self: Axes, values: list[int], bins: list[float], **kw: Any) -> Any:
        drawn.append((values, bins, kw))
        axes.append(self)
        return hist(self, values, bins=bins, **kw)

    monkeypatch.setattr(Axes, "hist", spy)
    seq.plot(REPORT, tmp_path / "p.png")
    assert drawn == [([16] * 17 + [32, 64, 64], [0.5, 16.5, 32.5, 64.5],
                      {"alpha": 0.6, "density": True, "label": "clean (mean 21)"})]  # density: a share of images
    ax = axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2  # a tick per round's doubling
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "copies used (budget 64)", "share of images", "tiny: copies used at confidence 0.99")
    png = (tmp_path / "p.png").read_bytes()
    assert png[:4] == b"\x89PNG" and (int.from_bytes(png[16:20]), int.from_bytes(png[20:24])) == (720, 420)


def test_main_writes_json_markdown_and_plot_beside_the_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    asked: list[argparse.Namespace] = []
    monkeypatch.setattr(seq, "evaluate_sequential", lambda args: asked.append(args) or REPORT)
    mine = tmp_path / "mine"
    for argv, out in (([], checkpoint / "eval" / "sequential"), (["--output", str(mine)], mine)):
        for _ in range(2):  # a second run writes over the first
            seq.main([str(checkpoint), "--budget", "64", *argv])
            assert asked.pop().budget == 64
            assert (out / "sequential.json").read_text() == json.dumps(REPORT, indent=2) + "\n"
            assert (out / "sequential.md").read_text() == seq.to_markdown(REPORT)
            assert (out / "sequential.png").stat().st_size > 0
            assert capsys.readouterr().out == (f"{seq.to_markdown(REPORT)}\nwrote {out / 'sequential.json'}, "
                                               f"{out / 'sequential.md'}, {out / 'sequential.png'}\n")
    (tmp_path / "a file").write_text("")
    with pytest.raises(SystemExit, match=r"^siam evaluate --sequential: cannot write the results to .*a file"):
        seq.main([str(checkpoint), "--output", str(tmp_path / "a file" / "out")])


def test_shares_and_summaries_of_copies_used() -> None:
    assert seq.share(torch.tensor([True, False, True, True])) == {"value": 0.75,
                                                                  "ci95": list(clopper_pearson(3, 4))}
    empty = seq.share(torch.tensor([], dtype=torch.bool))
    assert np.isnan(empty["value"]) and empty["ci95"] == list(clopper_pearson(0, 0))
    used = torch.tensor([16, 16, 32, 64, 16, 256, 16, 32, 16, 128])
    a = used.numpy().astype(float)
    assert seq.summarize_used(used) == pytest.approx({"mean": a.mean(), "p50": np.quantile(a, 0.5),
                                                      "p95": np.quantile(a, 0.95), "max": 256.0})
