"""Sequential sampling: the schedule, the error rate of the stopping rule, the library, the engine's rounds
and the API fields."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from service_helpers import image_bytes
from test_engine import GatedBackend, engine_with, image
from test_smooth import CoinNet, ConstantNet

from models import Smooth, SmoothingSpec
from models.resnet import Classifier, Normalize
from models.sequential import SequentialVote, rounds, vote_decided
from service.app import create_app
from service.sequential import predict_sequential
from service.settings import Settings


def test_rounds_double_the_total_and_end_at_the_budget() -> None:
    assert rounds(256) == [16, 16, 32, 64, 128]
    assert rounds(100) == [16, 16, 32, 36]
    assert rounds(10) == [10] and rounds(17) == [16, 1]
    assert all(sum(rounds(b)) == b for b in range(1, 600))
    with pytest.raises(ValueError):
        rounds(0)


def test_a_unanimous_vote_is_decided_and_a_tie_never_is() -> None:
    assert vote_decided(torch.tensor([16, 0, 0]), 0.001)
    assert not vote_decided(torch.tensor([8, 8, 0]), 0.5)
    assert not vote_decided(torch.tensor([9, 7, 0]), 0.05)


def simulate(probabilities: list[float], budget: int, confidence: float, trials: int,
             seed: int = 0) -> tuple[list[bool], list[int], list[int]]:
    """Sequential votes of a base classifier whose copies vote class c with ``probabilities[c]``."""
    generator = torch.Generator().manual_seed(seed)
    p = torch.tensor(probabilities)
    decided, labels, used = [], [], []
    for _ in range(trials):
        vote = SequentialVote(budget, confidence, len(probabilities))
        while n := vote.next_round():
            classes = torch.multinomial(p, n, replacement=True, generator=generator)
            vote.add(torch.nn.functional.one_hot(classes, len(probabilities)).float())
        decided.append(vote.decided)
        labels.append(int(vote.counts.argmax()))
        used.append(vote.used)
    return decided, labels, used


def test_the_stopping_rule_errs_less_often_than_its_confidence_allows() -> None:
    """The hardest case for a vote is a tie: the binomial test's null hypothesis then holds exactly, so
    every image that is decided at all counts against the guarantee. Over many images that share must
    stay under alpha = 1 - confidence although the rule looks five times (testing each look at alpha
    instead of alpha / 5 decides a quarter of them). Near a tie (0.49 against 0.51), deciding for the
    weaker class must be as rare."""
    alpha, trials = 0.1, 3000
    decided, _, _ = simulate([0.5, 0.5], 256, 1 - alpha, trials)
    assert sum(decided) / trials <= alpha, sum(decided) / trials
    decided, labels, _ = simulate([0.49, 0.51], 256, 1 - alpha, trials, seed=1)
    wrong = sum(d and label == 0 for d, label in zip(decided, labels, strict=True)) / trials
    assert wrong <= alpha, wrong
    assert sum(decided) > 0  # and it does decide sometimes


def test_clear_votes_stop_early_and_close_ones_use_the_budget() -> None:
    decided, labels, used = simulate([0.95, 0.05], 256, 0.999, 300)
    assert all(decided) and set(labels) == {0}
    assert sum(used) / len(used) <= 48  # the target: mean copies used <= 48 of 256 on clear images
    decided, _, used = simulate([0.5, 0.5], 256, 0.999, 100)
    assert sum(decided) <= 2 and sum(u == 256 for u in used) >= 98


def classifier(net: torch.nn.Module) -> Classifier:
    return Classifier(Normalize((0, 0, 0), (1, 1, 1)), net).eval()


def test_smooth_predict_sequential_stops_a_constant_model_after_one_round() -> None:
    smooth = Smooth(classifier(ConstantNet(4)), SmoothingSpec(sigma=0.25), 10)
    (prediction, decided), = smooth.predict_sequential(torch.rand(1, 3, 32, 32), 256, 0.999)
    assert decided and prediction.label == 4 and prediction.samples == 16
    coin = Smooth(classifier(CoinNet()), SmoothingSpec(sigma=0.5), 10)
    answers = coin.predict_sequential(torch.zeros(2, 3, 32, 32), 128, 0.999, seed=3)
    assert [a[1] for a in answers] == [False, False] and [a[0].samples for a in answers] == [128, 128]
    again = coin.predict_sequential(torch.zeros(2, 3, 32, 32), 128, 0.999, seed=3)
    assert [a[0].probabilities for a in again] == [a[0].probabilities for a in answers]  # seeded: reproducible


def test_the_rounds_of_a_seeded_request_draw_independent_noise() -> None:
    coin = Smooth(classifier(CoinNet()), SmoothingSpec(sigma=0.5), 10, chunk_rows=1000)
    recorded: list[torch.Tensor] = []
    original = coin._forward_rows

    def spy(rows: torch.Tensor, source: object) -> torch.Tensor:
        out = original(rows, source)  # type: ignore[arg-type]
        recorded.append(out)
        return out

    coin._forward_rows = spy  # type: ignore[method-assign]
    coin.predict_sequential(torch.zeros(1, 3, 32, 32), 64, 0.999, seed=7)
    assert [r.shape[0] for r in recorded] == [16, 16, 32]  # a fair coin is never decided: every round runs
    assert not torch.equal(recorded[0], recorded[1])  # round 2 is not round 1's noise again


class AlternatingBackend(GatedBackend):
    """Copies vote class 0 and 1 in turn: a tie that is never decided."""

    def logits(self, images: torch.Tensor, samples: Sequence[int], seeds: Sequence[int | None]) -> torch.Tensor:
        super().logits(images, samples, seeds)
        rows = torch.arange(sum(samples)) % 2
        return torch.nn.functional.one_hot(rows, 10).float()


def test_engine_rounds_share_batches_with_fixed_requests_and_stop_when_decided() -> None:
    async def scenario() -> tuple[list[list[int]], list[list[int]]]:
        decisive = GatedBackend()  # zeros: every copy votes class 0
        decisive.gate.set()
        engine = engine_with(decisive)
        sequential, fixed = await asyncio.gather(
            predict_sequential(engine, image(), 256, 0.999, "softmax", None, 10.0, 10),
            engine.predict(image(), 8, "softmax"))
        assert sequential[0].decided and sequential[0].prediction.samples == 16
        assert fixed[0].decided is None and fixed[0].prediction.samples == 8
        await engine.stop()
        tie = AlternatingBackend()
        tie.gate.set()
        engine = engine_with(tie)
        answers = await predict_sequential(engine, torch.rand(2, 3, 8, 8), 64, 0.999, "vote", None, 10.0, 10)
        assert [a.decided for a in answers] == [False, False]
        assert [a.prediction.samples for a in answers] == [64, 64]
        await engine.stop()
        return decisive.calls, tie.calls

    decisive_calls, tie_calls = asyncio.run(scenario())
    assert decisive_calls == [[16, 8]]  # one batch: the first round beside the fixed request, no second round
    assert tie_calls == [[16, 16], [16, 16], [32, 32]]


@pytest.fixture(scope="module")
def client(checkpoint: Path) -> TestClient:
    settings = Settings(checkpoint=checkpoint, backend="torch", chunk_rows=64, threads=1, max_samples=256)
    with TestClient(create_app(settings)) as c:
        yield c  # type: ignore[misc]


def test_the_api_answers_samples_used_and_decided_only_when_asked(client: TestClient) -> None:
    png = {"content": image_bytes(1), "headers": {"content-type": "image/png"}}
    plain = client.post("/predict?samples=32", **png).json()
    assert "samples_used" not in plain and "decided" not in plain
    answer = client.post("/predict?samples=128&confidence=0.99", **png).json()
    assert answer["samples"] == 128 and 16 <= answer["samples_used"] <= 128
    assert isinstance(answer["decided"], bool)
    assert answer["decided"] or answer["samples_used"] == 128  # undecided: the whole budget
    assert client.post("/predict?samples=64&confidence=0.99&certify=true", **png).status_code == 422
    assert client.post("/predict?samples=64&confidence=1.5", **png).status_code == 422
    metrics = client.get("/metrics").text
    assert 'siam_samples_used_count{decided="' in metrics
    x = torch.rand(2, 3, 32, 32).numpy()
    body = {"inputs": [{"name": "images", "shape": [2, 3, 32, 32], "datatype": "FP32", "data": x.ravel().tolist()}],
            "parameters": {"samples": 64, "confidence": 0.99}}
    out = {o["name"]: o for o in client.post("/v2/models/tiny/infer", json=body).json()["outputs"]}
    assert out["samples_used"]["datatype"] == "INT64" and len(out["samples_used"]["data"]) == 2
    assert out["decided"]["datatype"] == "BOOL"
    body["parameters"]["confidence"] = "high"
    assert client.post("/v2/models/tiny/infer", json=body).status_code == 422


def test_siam_evaluate_sequential_reports_copies_used_clean_and_attacked(tiny_cifar_tar: Path, tiny_checkpoint: Path,
                                                                         tmp_path: Path) -> None:
    import json

    from training import evaluate

    out = tmp_path / "seq"
    evaluate.main([str(tiny_checkpoint), "--sequential", "--data", str(tiny_cifar_tar), "--cache-dir",
                   str(tmp_path / "cache"), "--images", "8", "--attacked-images", "4", "--stalling-images", "2",
                   "--budget", "32", "--steps", "1", "--adaptive-samples", "2", "--batch-size", "4", "--threads", "1",
                   "--output", str(out)])
    report = json.loads((out / "sequential.json").read_text())
    clean, attacked, stalling = (report["results"][k] for k in ("clean", "attacked", "stalling"))
    assert clean["images"] == 8 and attacked["images"] == 4 and stalling["images"] == 2
    for r in (clean, attacked, stalling):
        assert all(16 <= u <= 32 for u in r["copies_used_all"])  # rounds of 16 then 16: 16 or 32 copies
        assert 0 <= r["agreement_with_fixed"]["value"] <= 1 and r["images_per_s"]["fixed"] > 0
        undecided = r["copies_used_all"].count(32)
        assert undecided >= round((1 - r["decided"]["value"]) * r["images"])
    assert (out / "sequential.md").read_text().startswith("### tiny: sequential sampling, budget 32")
    assert (out / "sequential.png").stat().st_size > 0


def test_the_sequential_benchmark_measures_both_modes_side_by_side(tiny_cifar_tar: Path, checkpoint: Path,
                                                                    tmp_path: Path) -> None:
    import json

    from benchmarks import sequential as bench

    out = tmp_path / "seq.json"
    bench.main([str(checkpoint), "--data", str(tiny_cifar_tar), "--cache-dir", str(tmp_path / "cache"), "--images",
                "8", "--budget", "32", "--clients", "4", "--rounds", "1", "--requests", "1", "--threads", "1",
                "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["predictions_per_s"]["fixed"] > 0 and result["predictions_per_s"]["sequential"] > 0
    assert result["mean_copies_used"]["fixed"] == 32 and 16 <= result["mean_copies_used"]["sequential"] <= 32
    assert result["ratio"] == result["predictions_per_s"]["sequential"] / result["predictions_per_s"]["fixed"]


def test_confidence_must_lie_strictly_between_one_half_and_one() -> None:
    for bad in (0.5, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"confidence must be in \(0.5, 1\)"):
            SequentialVote(16, bad, 10)
    assert SequentialVote(16, 0.9, 10).counts.dtype == torch.int64


def test_a_vote_is_decided_only_when_the_aggregation_rule_names_the_same_class() -> None:
    """15 copies prefer class 0 by a little, one prefers class 1 enormously: the vote (15 to 1) and the
    mean softmax name class 0, the mean logit names class 1, so under the logits rule nothing is decided."""
    logits = torch.tensor([[5.0, 0.0]] * 15 + [[0.0, 1000.0]])
    decided = {}
    for rule in ("vote", "softmax", "logits"):
        vote = SequentialVote(16, 0.99, 2, rule)
        vote.add(logits)
        decided[rule] = vote.decided
    assert decided == {"vote": True, "softmax": True, "logits": False}


def test_round_seeds_are_fixed_and_distinct() -> None:
    from models.noise import row_seed
    from models.sequential import round_seed

    assert round_seed(None, 3) is None and round_seed(7, 0) == 7
    # fixed across releases, so a seeded request keeps its answer
    assert [round_seed(7, r) for r in (1, 2)] == [row_seed(7, 2**40 + 1), row_seed(7, 2**40 + 2)]
    assert len({7, round_seed(7, 1), round_seed(7, 2), round_seed(8, 1)}) == 4


def test_each_image_of_a_seeded_call_draws_from_seed_plus_its_index() -> None:
    coin = Smooth(classifier(CoinNet()), SmoothingSpec(sigma=0.5), 10)
    both = coin.predict_sequential(torch.zeros(2, 3, 32, 32), 64, 0.999, seed=10)
    alone = coin.predict_sequential(torch.zeros(1, 3, 32, 32), 64, 0.999, seed=11)
    assert both[1][0].probabilities == alone[0][0].probabilities
    assert both[0][0].probabilities != both[1][0].probabilities


def test_votes_add_up_over_rounds_and_wrong_round_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="budget must be >= 1, got 0"):
        rounds(0)
    vote = SequentialVote(64, 0.999, 3)
    with pytest.raises(ValueError, match="round 0 needs 16 copies, got 8"):
        vote.add(torch.zeros(8, 3))
    alternating = torch.nn.functional.one_hot(torch.arange(16) % 2, 3).float()  # a tie: never decided
    vote.add(alternating)
    vote.add(alternating)
    assert vote.counts.tolist() == [16, 16, 0] and vote.used == 32 and not vote.decided
    assert vote.next_round() == 32


def test_under_the_logits_rule_a_unanimous_vote_for_class_one_is_decided() -> None:
    vote = SequentialVote(16, 0.99, 2, "logits")
    vote.add(torch.tensor([[0.0, 5.0]] * 16))
    assert vote.decided and int(vote.counts.argmax()) == 1


class FifteenToOneNet(torch.nn.Module):
    """In every 16 rows of a forward, 15 copies prefer class 0 by a little and the 16th prefers class 1
    enormously: the vote names class 0, the mean softmax class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(z.shape[0], 10)
        out[:, 0], out[:, 1] = 1.0, 0.9
        strong = torch.arange(z.shape[0]) % 16 == 15
        out[strong, 0], out[strong, 1] = 0.0, 100.0
        return out


@pytest.mark.parametrize(("spec_rule", "asked", "label", "decided", "used"),
                         [("vote", None, 0, True, 32), ("softmax", None, 1, False, 64),
                          ("softmax", "vote", 0, True, 32), ("vote", "softmax", 1, False, 64)])
def test_smooth_predict_sequential_decides_and_answers_under_the_rule_asked_else_the_models(
        spec_rule: str, asked: str | None, label: int, decided: bool, used: int) -> None:
    """30 votes to 2 decide the vote at 0.999 after two rounds; under the softmax rule the answer is class 1,
    which the vote does not back, so it is never decided and uses the whole budget."""
    smooth = Smooth(classifier(FifteenToOneNet()), SmoothingSpec(sigma=0.25, aggregation=spec_rule), 10)
    (prediction, was_decided), = smooth.predict_sequential(torch.rand(1, 3, 32, 32), 64, 0.999, asked)
    assert (prediction.label, was_decided, prediction.samples) == (label, decided, used)
    if (asked or spec_rule) == "vote":
        assert prediction.probabilities[:2] == [30 / 32, 2 / 32] and prediction.vote_share == 30 / 32
