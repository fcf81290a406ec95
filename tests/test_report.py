"""The robustness report: NAttack, the eps-sweep check, the choice of sigma and m, the held-out validation
split, and a whole (tiny) ``siam evaluate --report --quick`` run."""

from __future__ import annotations

import inspect
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models import Smooth, SmoothingSpec, load_checkpoint
from models.pni import pni_layers
from models.resnet import Classifier
from tests.test_attacks import accuracy, separable_problem
from training import evaluate, report, report_render, train
from training.attacks import pgd, smoothed_probabilities
from training.data import load_split
from training.nattack import gap, margin, nattack, project, to_tanh_space
from training.robustness import choose_operating_point, correct_by_m, eps_sweep, noise_free, sweep_problems

EPS = 8 / 255


@pytest.fixture(scope="module")
def problem() -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    model, x, y = separable_problem(n=40)
    return model, x, y


def test_projection_stays_in_the_ball_and_the_box() -> None:
    x = torch.rand(4, 3, 8, 8)
    x[0] = 0.0
    x[1] = 1.0
    w = to_tanh_space(x) + 5 * torch.randn(4, 3, 8, 8)
    adv = project(x, w, EPS)
    assert (adv - x).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert torch.allclose(project(x, to_tanh_space(x), EPS), x, atol=1e-4)
    # finite at the box's edges: an infinite point could never move, so a black or white pixel would stay put
    assert torch.isfinite(to_tanh_space(torch.tensor([0.0, 1.0]))).all()


def test_margin_is_positive_only_while_the_label_is_right() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
    m = margin(probs, torch.tensor([0, 0]))
    assert m[0] == pytest.approx(float(torch.log(torch.tensor(0.7 / 0.2))), rel=1e-5) and m[1] == 0
    assert margin(probs, torch.tensor([0, 0]), kappa=2.0)[1] == pytest.approx(2.0 - float(torch.log(torch.tensor(3.5))))


def test_nattack_fools_a_non_robust_model_with_queries_only(
        problem: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = problem
    x, y = x[:20], y[:20]
    calls = []

    def black_box(images: torch.Tensor) -> torch.Tensor:
        calls.append(images.shape[0])
        with torch.no_grad():
            return model(images).softmax(1)

    assert accuracy(model, x, y) > 0.95
    result = nattack(black_box, x, y, eps=EPS, population=30, max_queries=1500,
                     generator=torch.Generator().manual_seed(0))
    adv = result.adversarial
    assert (adv - x).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert accuracy(model, adv, y) < 0.2
    with torch.no_grad():  # a deterministic model: the attack's own success check is the truth
        assert torch.equal(result.success, model(adv).argmax(1) != y)
    assert int(result.queries.max()) <= 1500 and sum(calls) == int(result.queries.sum())


def test_nattack_spends_the_budget_on_a_model_it_cannot_fool() -> None:
    x, y = torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2])

    def always_right(images: torch.Tensor) -> torch.Tensor:
        # no image is ever fooled, so every query batch holds all three images in order
        return torch.nn.functional.one_hot(y.repeat_interleave(images.shape[0] // 3), 10).float()

    result = nattack(always_right, x, y, population=30, max_queries=300)
    assert not result.success.any() and 300 - 31 < int(result.queries.min()) <= int(result.queries.max()) <= 300
    assert (result.adversarial - x).abs().max() <= EPS + 1e-6


def test_nattack_through_the_smoothed_black_box(problem: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = problem
    x, y = x[:6], y[:6]
    torch.manual_seed(0)
    smooth = Smooth(model, SmoothingSpec(sigma=0.05), 10)
    before = correct_by_m(smooth, x, y, [16])[16].float().mean()
    result = nattack(smoothed_probabilities(smooth, 4), x, y, eps=EPS, population=50, max_queries=1000, kappa=0.5,
                     generator=torch.Generator().manual_seed(0))
    after = correct_by_m(smooth, result.adversarial, y, [16])[16].float().mean()
    assert before > 0.9 and after <= 0.5
    assert (result.adversarial - x).abs().max() <= EPS + 1e-6


def test_one_iteration_moves_the_mean_as_the_papers_update_says() -> None:
    """One round by hand, from the paper (Li et al. 2019, Algorithm 1): mu += lr / (P sigma) * sum_i A_i z_i,
    A the standardised rewards -max(0, gap + kappa) of the P candidates; then the mean's projection is
    checked. The label trails by 0.1 in log-probability (not yet a mistake at kappa 0.25), so some
    candidates are past -kappa and the clamp at 0 shapes the update."""
    torch.manual_seed(0)
    x, weights = torch.rand(2, 3, 4, 4), torch.randn(48, 5)
    y = torch.tensor([1, 3])
    logits = x.flatten(1) @ weights
    others = logits.scatter(1, y[:, None], -float("inf")).amax(1)
    bias = torch.zeros(2, 5)
    bias[torch.arange(2), y] = others - logits[torch.arange(2), y] - 0.1
    population, sigma, lr, kappa = 8, 0.1, 0.02, 0.25  # sigma and lr: the defaults, left out of the call

    def box(images: torch.Tensor) -> torch.Tensor:
        """A linear model on the pixels, each image with its own bias row: every answer recomputable."""
        per_image = images.shape[0] // 2
        return (images.flatten(1) @ weights + bias.repeat_interleave(per_image, 0)).softmax(1)

    result = nattack(box, x, y, eps=EPS, population=population, kappa=kappa, max_queries=population + 2,
                     generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    mu = 0.001 * torch.randn(x.shape, generator=generator)
    z = torch.randn((2, population, 3, 4, 4), generator=generator)
    w = to_tanh_space(x)
    candidates = project(x[:, None], (w + mu)[:, None] + sigma * z, EPS)
    logp = box(candidates.flatten(0, 1)).log().view(2, population, 5)
    labels = y[:, None, None].expand(2, population, 1)
    gaps = logp.gather(2, labels).squeeze(2) - logp.scatter(2, labels, -float("inf")).amax(2)
    assert ((gaps < -kappa).any(1) & (gaps > -kappa).any(1)).all()  # the clamp is at work in both images
    reward = -(gaps + kappa).clamp(min=0)
    advantage = (reward - reward.mean(1, keepdim=True)) / reward.std(1, unbiased=False, keepdim=True)
    mu = mu + lr / (population * sigma) * (advantage[:, :, None, None, None] * z).sum(1)
    expected = project(x, w + mu, EPS)
    assert torch.allclose(result.adversarial, expected, atol=1e-5)
    assert result.queries.tolist() == [population + 2] * 2  # a check, one round, the check of the new mean
    assert torch.equal(result.success, gap(box(expected), y) < -kappa)


def test_the_defaults_are_the_papers_cifar_settings() -> None:
    defaults = {k: v.default for k, v in inspect.signature(nattack).parameters.items() if v.default is not v.empty}
    assert {k: defaults[k] for k in ("eps", "population", "sigma", "lr", "kappa", "check_every")} == {
        "eps": 8 / 255, "population": 300, "sigma": 0.1, "lr": 0.02, "kappa": 0.0, "check_every": 10}
    # and they are the ones used: rounds of 300 candidates and a check every 10 rounds, here within 3,400
    # queries (a check, ten rounds, a check, an eleventh round, the final check)
    calls: list[int] = []
    result = nattack(fixed_box([0.9, 0.1], calls), torch.rand(1, 3, 4, 4), torch.tensor([0]), max_queries=3400)
    assert calls == [1] + [300] * 10 + [1, 300, 1] and result.queries.tolist() == [3303]


def fixed_box(probabilities: list[float], calls: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A black box that answers ``probabilities`` whatever it is shown, counting the images."""
    def f(images: torch.Tensor) -> torch.Tensor:
        calls.append(images.shape[0])
        return torch.tensor(probabilities).expand(images.shape[0], -1)
    return f


def test_an_image_counts_as_fooled_only_once_another_class_leads_by_kappa() -> None:
    """The label's probability 0.3 against 0.5: a gap of log(0.3 / 0.5) = -0.51 in log-probability."""
    x, y = torch.rand(1, 3, 4, 4), torch.tensor([0])
    calls: list[int] = []
    done = nattack(fixed_box([0.3, 0.5, 0.2], calls), x, y, population=10, max_queries=100, kappa=0.4)
    assert done.success.tolist() == [True] and done.queries.tolist() == [1] and calls == [1]
    tie = nattack(fixed_box([0.4, 0.4, 0.2], []), x, y, population=10, max_queries=30)
    assert tie.success.tolist() == [False]  # a tie with another class is not yet a mistake
    calls.clear()
    spent: list[int] = []
    short = nattack(fixed_box([0.3, 0.5, 0.2], calls), x, y, population=10, max_queries=100, kappa=0.6,
                    progress=spent.append)
    assert short.success.tolist() == [False] and short.queries.tolist() == [sum(calls)] == [sum(spent)]


@pytest.mark.parametrize(("check_every", "budget", "queries"), [(10, 300, 272), (3, 300, 274), (10, 301, 272),
                                                               (10, 332, 302)])
def test_the_mean_is_checked_every_check_every_rounds_and_once_more_at_the_end(check_every: int, budget: int,
                                                                               queries: int) -> None:
    """Never fooled, 30 candidates a round, at most 300 queries: nine rounds fit (270 queries). With
    check_every 10 the mean is checked before round 0 and once no round fits (272); with 3, also before
    rounds 3 and 6, and the last check falls on round 9's turn (274). With 301, a tenth round would leave
    no query for the final check, so it does not run; with 332, the check before round 10 leaves 30
    queries, and a round would leave none for the check of its mean (302)."""
    x, y = torch.rand(2, 3, 4, 4), torch.tensor([0, 0])
    calls: list[int] = []
    result = nattack(fixed_box([0.9, 0.1], calls), x, y, population=30, max_queries=budget, check_every=check_every)
    assert result.queries.tolist() == [queries, queries] and sum(calls) == 2 * queries
    assert result.queries.dtype == torch.long


def test_eps_sweep_is_monotone_and_reaches_zero(problem: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = problem
    x, y = x[:20], y[:20]
    torch.manual_seed(0)
    smooth = Smooth(model, SmoothingSpec(sigma=0.1), 10)

    def attack(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
        return pgd(smooth.forward_noisy, a, b, eps=eps, step=2.5 * eps / 10, steps=10, eot=2)

    def judge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return correct_by_m(smooth, a, b, [8])[8]

    rows = eps_sweep(attack, judge, x, y, [0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 32 / 255, 64 / 255])
    accs = [r["accuracy"] for r in rows]
    assert accs[0] > 0.95 and accs[-1] == 0.0
    assert all(b <= a + 0.05 for a, b in itertools.pairwise(accs))
    assert sweep_problems(rows) == []
    assert all(r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] for r in rows)


def test_sweep_check_flags_a_plateau_and_a_rise() -> None:
    def rows(accs: list[float], eps: list[int]) -> list[dict]:
        return [{"eps": e / 255, "accuracy": a, "images": 100} for a, e in zip(accs, eps, strict=True)]

    assert sweep_problems(rows([0.8, 0.5, 0.2, 0.01], [0, 8, 16, 64])) == []
    plateau = sweep_problems(rows([0.8, 0.5, 0.45, 0.45], [0, 8, 16, 64]))
    assert len(plateau) == 1 and "64/255" in plateau[0]
    rise = sweep_problems(rows([0.8, 0.4, 0.6, 0.0], [0, 8, 16, 64]))
    assert len(rise) == 1 and "rises" in rise[0]
    assert "never reaches" in sweep_problems(rows([0.8, 0.4], [0, 8]))[0]


def test_accuracy_at_every_m_from_one_batch_of_copies(problem: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = problem
    exact = Smooth(model, SmoothingSpec(sigma=0.0), 10)  # no noise: every m must agree with the model itself
    by_m = correct_by_m(exact, x, y, [1, 4, 16])
    with torch.no_grad():
        truth = (model(x).argmax(1) == y).cpu()
    assert all(torch.equal(by_m[m], truth) for m in (1, 4, 16))


def test_noise_free_surrogate_turns_pni_off_and_back_on() -> None:
    from tests.conftest import make_model

    model, _ = make_model(pni="channel")
    layers = pni_layers(model)
    layers[0].enabled = False  # a layer already off stays off afterwards
    x = torch.rand(2, 3, 32, 32)
    with noise_free(model) as surrogate, torch.no_grad():
        assert not any(layer.enabled for layer in layers)
        assert torch.equal(surrogate(x), surrogate(x))  # deterministic
    assert [layer.enabled for layer in layers] == [False] + [True] * (len(layers) - 1)


def test_operating_point_is_the_cheapest_m_near_the_best_sigma() -> None:
    rows = [{"sigma": s, "samples": m, "clean": 0.8, "robust": r}
            for s, curve in ((0.1, (0.30, 0.40, 0.41)), (0.2, (0.35, 0.44, 0.445)), (0.4, (0.2, 0.3, 0.35)))
            for m, r in zip((1, 8, 64), curve, strict=True)]
    choice = choose_operating_point(rows, tolerance=0.01)
    assert (choice["sigma"], choice["samples"]) == (0.2, 8)
    assert choose_operating_point(rows, tolerance=0.0)["samples"] == 64


def test_val_images_are_held_out_of_training_and_used_by_the_report(tiny_cifar_tar: Path, tmp_path: Path) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    train.main(["--data", str(tiny_cifar_tar), "--cache-dir", str(cache), "--output", str(out), "--batch-size", "32",
                "--eval-images", "8", "--eval-attack-images", "4", "--threads", "1", "--epochs", "1",
                "--max-steps", "1", "--attack", "fgsm", "--val-images", "40", "--val-seed", "3"])
    _, manifest = load_checkpoint(out / "checkpoint")
    record = manifest.training["data"]
    assert record["train_images"] == 360 and record["validation"]["images"] == 40
    args = report.resolve(report.build_parser().parse_args(
        ["--data", str(tiny_cifar_tar), "--cache-dir", str(cache), "--val-images", "10", "--quick"]))
    val, info = report.validation_set(manifest, args)
    assert info["seen_in_training"] == "no" and info["seed"] == 3 and len(val) == 10
    _, rest = load_split(tiny_cifar_tar, "train", cache).hold_out(40, 3)
    seen = {bytes(img.numpy()) for img in rest.images}
    assert not any(bytes(img.numpy()) in seen for img in val.images)
    with pytest.raises(SystemExit, match="val-images"):  # resuming with another holdout would change the data
        train.main(["--data", str(tiny_cifar_tar), "--cache-dir", str(cache), "--output", str(out),
                    "--batch-size", "32", "--threads", "1", "--epochs", "2", "--attack", "fgsm"])


def test_report_quick_run_writes_markdown_json_and_figures(tiny_checkpoint: Path, tiny_cifar_tar: Path,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports"
    evaluate.main([
        "--report", "--quick", str(tiny_checkpoint), "--data", str(tiny_cifar_tar), "--cache-dir", str(tmp_path / "c"),
        "--output", str(out), "--threads", "1", "--samples", "1,2,4", "--sigmas", "0.1,0.25",
        "--val-images", "4", "--test-images", "6", "--strong-images", "4", "--nattack-images", "2",
        "--certify-images", "2", "--certify-n0", "4", "--certify-n", "16", "--steps", "1", "--eot", "2",
        "--eot-large", "2", "--adaptive-samples", "2", "--strong-steps", "2", "--strong-eot", "1", "--restarts", "1",
        "--transfer-steps", "1", "--sweep-eps", "0,8,64", "--sweep-steps", "1", "--sweep-eot", "1",
        "--nattack-population", "4", "--nattack-queries", "20", "--nattack-samples", "1", "--latency-repeats", "1",
        "--apgd-steps", "2", "--apgd-eot", "1"])
    said = capsys.readouterr().out
    assert said.startswith(f"robustness report for 1 checkpoint(s) (tiny) into {out}/; the quick preset")
    assert "name checkpoints" not in said and f"[1/1] {tiny_checkpoint}" in said
    folder = out / "tiny" / "quick"
    r = json.loads((folder / "report.json").read_text())
    assert r["quick"] and r["data"]["test_images"] == 6 and r["data"]["validation"]["images"] == 4
    assert r["data"]["validation"]["seen_in_training"] == "possibly"  # the tiny checkpoint records no training data
    assert len(r["grid"]) == 2 * 5 * 3  # sigmas x (4 attacks + worst case) x m
    rows = r["grid"] + r["strong"]["rows"] + r["strong"]["eps_sweep"]["rows"] + r["nattack"]["rows"]
    assert all(x["ci95"][0] <= x["accuracy"] <= x["ci95"][1] for x in rows)
    assert {x["attack"] for x in r["strong"]["rows"]} == {"eot2-pgd1", "pgd2-eot1-r1", "apgd-ce-2-eot1",
                                                         "apgd-dlr-2-eot1", "transfer"}
    assert r["validation"]["choice"]["sigma"] in (0.1, 0.25) and r["certify"][0]["n"] == 16
    assert [p["samples"] for p in r["latency_ms"]] == [1, 2, 4]
    assert r["nattack"]["max_linf"] <= 8 / 255 + 1e-6
    checks = {c["check"] for c in r["findings"]["checks"]}
    assert any("eps sweep" in c for c in checks) and any("NAttack" in c for c in checks)
    # Sequential sampling: every test image clean, the strong attack's images attacked, budget = largest m.
    seq = r["sequential"]
    assert seq["budget"] == 4 and seq["confidence"] == 0.999
    assert seq["results"]["clean"]["images"] == 6
    assert seq["results"]["attacked"]["images"] == seq["results"]["stalling"]["images"] == 4
    for kind in ("clean", "attacked", "stalling"):
        used = seq["results"][kind]["copies_used_all"]
        assert all(1 <= u <= 4 for u in used) and len(used) == seq["results"][kind]["images"]
    md = (folder / "report.md").read_text()
    for part in ("## Summary", "## 1. Choosing sigma", "## 4. Eps sweep", "## 5. NAttack",
                 "## 7. Sequential sampling", "## 8. Discussion", "60.4%", "(quick subset)", "tradeoff.png",
                 "sequential.png"):
        assert part in md
    for name in ("tradeoff.png", "eps_sweep.png", "certified.png", "sequential.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"
    assert "tiny (quick)" in (out / "README.md").read_text()


def test_paired_difference_counts_only_the_images_that_changed() -> None:
    from training.measure import paired_difference

    before = torch.tensor([True] * 60 + [False] * 40)
    after = before.clone()
    after[60:70] = True  # 10 gained
    after[:2] = False  # 2 lost
    d = paired_difference(after, before)
    assert (d["gained"], d["lost"], d["images"]) == (10, 2, 100)
    assert d["difference"] == pytest.approx(0.08)
    # Newcombe's Wald interval for paired proportions: se = sqrt(b + c - (b - c)^2 / n) / n
    se = (12 - 64 / 100) ** 0.5 / 100
    assert d["ci95"] == pytest.approx([0.08 - 1.959964 * se, 0.08 + 1.959964 * se], abs=1e-6)
    assert paired_difference(before, before)["ci95"] == [0.0, 0.0]


def test_every_aggregation_rule_reads_the_same_copies() -> None:
    from tests.conftest import make_lively_model
    from training.robustness import answers_by_m, answers_by_rule

    model, spec = make_lively_model()
    smooth = Smooth(model, spec.smoothing, 10)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    answers = answers_by_rule(smooth, x, [1, 16], ["vote", "logits", "softmax"])
    torch.manual_seed(0)
    logits = smooth.noisy_logits(x, [16] * 8).view(8, 16, -1)
    assert torch.equal(answers["vote"].labels[16],
                       torch.nn.functional.one_hot(logits.argmax(-1), 10).sum(1).float().argmax(1))
    assert torch.equal(answers["softmax"].labels[16], logits.softmax(-1).mean(1).argmax(1))
    assert torch.equal(answers["logits"].labels[16], logits.mean(1).argmax(1))
    for rule in ("vote", "logits", "softmax"):  # one copy: every rule answers its argmax; the votes are shared
        assert torch.equal(answers[rule].labels[1], logits[:, 0].argmax(-1))
        assert torch.equal(answers[rule].votes[16], answers["vote"].votes[16])
    torch.manual_seed(1)  # and the answers move with the noise, so rules that drew their own copies would differ
    assert not torch.equal(answers_by_m(smooth, x, [1]).labels[1], answers["softmax"].labels[1])


def test_answers_by_m_are_prefixes_of_one_draw_and_certify_uses_both_sets() -> None:
    from tests.conftest import make_model
    from training.robustness import answers_by_m, certify_by_m

    model, spec = make_model(sigma=0.25)
    smooth = Smooth(model, spec.smoothing, 10)
    x = torch.rand(3, 3, 32, 32)
    torch.manual_seed(0)
    answers = answers_by_m(smooth, x, [1, 4, 16])
    assert all(int(v.sum()) == 3 * m for m, v in answers.votes.items())  # m votes per image
    torch.manual_seed(0)
    logits = smooth.noisy_logits(x, [16] * 3).view(3, 16, -1)
    assert torch.equal(answers.votes[4], torch.nn.functional.one_hot(logits[:, :4].argmax(-1), 10).sum(1))
    assert torch.equal(answers.labels[16], logits.softmax(-1).mean(1).argmax(1))
    # selection from the first set, counts (and so the bound) from the second
    unanimous = answers_by_m(smooth, x, [16])
    other = type(unanimous)({16: unanimous.labels[16]}, {16: torch.zeros(3, 10, dtype=torch.long)})
    other.votes[16][:, 3] = 16
    certs = certify_by_m(unanimous, other, sigma=0.25)[16]
    for cert, votes in zip(certs, unanimous.votes[16], strict=True):
        assert cert.counts == [0, 0, 0, 16, 0, 0, 0, 0, 0, 0]
        if int(votes.argmax()) == 3:  # 16 of 16 at alpha 0.001: p_lower = 0.001 ** (1 / 16)
            assert cert.label == 3 and cert.p_lower == pytest.approx(0.001 ** (1 / 16))
        else:  # the selected class got no estimation votes
            assert cert.abstained


@pytest.mark.parametrize(("attack", "says"), [
    ("pgd7", "the paper's PGD-k"), ("eot32-pgd7", "EOT-PGD-k"), ("pgd50-eot8-r2", "restarts"),
    ("adaptive8-pgd7", "smoothed soft output"), ("transfer", "noise-free"),
    ("apgd-ce-20-eot2", "APGD"), ("apgd-dlr-100-eot20", "APGD"),
])
def test_each_attack_row_of_the_report_says_what_that_attack_is(attack: str, says: str) -> None:
    assert says in report_render.note(attack)


def test_certified_accuracy_counts_right_unabstained_answers_whose_radius_reaches_each_r() -> None:
    """The README's certified column: right label, no abstention, radius >= r (the boundary counts), radii
    converted by ``scale`` into the space the question is asked in."""
    from models.smooth import ABSTAIN, Certificate
    from training.measure import clopper_pearson
    from training.robustness import accuracy_entry, certified_accuracy

    certs = [Certificate(3, 0.5, 0.9, []), Certificate(3, 0.1, 0.6, []), Certificate(ABSTAIN, 0.0, 0.4, []),
             Certificate(2, 0.9, 0.99, []), Certificate(7, 0.3, 0.8, [])]
    labels = [3, 3, 3, 3, 7]
    rows = certified_accuracy(certs, labels, [0.0, 0.1, 0.3, 0.5, 0.6])
    assert [r["radius"] for r in rows] == [0.0, 0.1, 0.3, 0.5, 0.6]
    assert [r["correct"] for r in rows] == [3, 3, 2, 1, 0]  # the wrong label's 0.9 and the abstention never count
    assert all(r["images"] == 5 for r in rows)
    assert rows[2]["accuracy"] == pytest.approx(0.4)
    assert rows[2]["ci95"] == pytest.approx(list(clopper_pearson(2, 5)))
    # radii of 0.1 and 0.3 certified in pixel space are 0.2 and 0.6 in a space twice as fine
    assert [r["correct"] for r in certified_accuracy(certs, labels, [0.2, 0.6, 1.0, 1.1], scale=2.0)] == [3, 2, 1, 0]
    with pytest.raises(ValueError):  # a certificate without its label (or the reverse) is a bug, not a miss
        certified_accuracy(certs, labels[:4], [0.0])
    empty = accuracy_entry(torch.zeros(0, dtype=torch.bool))
    assert empty["correct"] == empty["images"] == 0 and empty["ci95"] == [0.0, 1.0]
    assert empty["accuracy"] != empty["accuracy"]  # NaN: no images, no accuracy


def test_operating_point_sigma_is_judged_at_the_largest_m_and_ties_go_to_clean_accuracy_then_smaller_sigma() -> None:
    def rows(curves: dict[float, tuple[float, ...]], clean: dict[float, float] | None = None) -> list[dict]:
        return [{"sigma": s, "samples": m, "clean": (clean or {}).get(s, 0.8), "robust": r}
                for s, curve in curves.items() for m, r in zip((1, 8, 64), curve, strict=True)]

    # sigma 0.1 leads at m = 1 and 8, sigma 0.2 at m = 64: the choice is made at m = 64
    grid = rows({0.1: (0.50, 0.42, 0.40), 0.2: (0.30, 0.44, 0.45)}, clean={0.1: 0.7, 0.2: 0.75})
    choice = choose_operating_point(grid)  # the default tolerance: 1 point
    assert {k: choice[k] for k in ("sigma", "samples", "robust", "clean")} == {
        "sigma": 0.2, "samples": 8, "robust": 0.44, "clean": 0.75}
    assert "within 1 points of the best m at that sigma" in choice["rule"] and "at m=64" in choice["rule"]
    tied = rows(dict.fromkeys((0.1, 0.2, 0.4), (0.3, 0.4, 0.45)), clean={0.1: 0.7, 0.2: 0.8, 0.4: 0.8})
    assert choose_operating_point(tied)["sigma"] == 0.2  # best clean accuracy, then the smaller sigma
    with pytest.raises(ValueError, match=r"^no validation results to choose from$"):
        choose_operating_point([])


def test_certify_by_m_bounds_the_selected_class_on_the_second_set_at_alpha_one_in_a_thousand() -> None:
    from scipy.stats import norm

    from models.smooth import ABSTAIN
    from training.robustness import Answers, certify_by_m

    def answers(votes: list[tuple[int, int]]) -> Answers:  # (class, copies voting for it) per image, m = 16
        counts = torch.zeros(len(votes), 10, dtype=torch.long)
        for i, (c, n) in enumerate(votes):
            counts[i, c], counts[i, (c + 1) % 10] = n, 16 - n
        return Answers({16: counts.argmax(1)}, {16: counts})

    certs = certify_by_m(answers([(3, 16), (5, 16)]), answers([(3, 16), (5, 10)]), sigma=0.25)[16]
    p_lower = 0.001 ** (1 / 16)  # 16 of 16 at the default alpha
    assert certs[0].label == 3 and certs[0].p_lower == pytest.approx(p_lower)
    assert certs[0].radius == pytest.approx(0.25 * norm.ppf(p_lower))
    assert certs[1].label == ABSTAIN and certs[1].radius == 0.0  # 10 of 16 does not bound p above 1/2
    with pytest.raises(ValueError):  # a selection without its estimation set is a bug, not a shorter list
        certify_by_m(answers([(3, 16), (5, 16)]), answers([(3, 16)]), sigma=0.25)


def test_sweep_check_allows_two_images_of_noise_and_says_exactly_what_it_saw() -> None:
    def rows(accs: list[float], eps: list[int], images: int) -> list[dict]:
        return [{"eps": e / 255, "accuracy": a, "images": images} for a, e in zip(accs, eps, strict=True)]

    # 50 images: a rise of two images (0.04) is noise, of two and a half (0.05) is not; 100 images: 0.02 is noise
    assert sweep_problems(rows([0.8, 0.40, 0.44, 0.0], [0, 8, 16, 32], 50)) == []
    assert sweep_problems(rows([0.8, 0.40, 0.45, 0.0], [0, 8, 16, 32], 50)) == [
        "accuracy rises from 40.0% at eps 8/255 to 45.0% at eps 16/255"]
    # a rise of exactly the tolerance is allowed (exact binary fractions, so no rounding decides it)
    exact = [{"eps": e, "accuracy": a, "images": 1000} for e, a in ((0.0, 0.5), (0.25, 0.75), (0.5, 0.0))]
    assert sweep_problems(exact, tolerance=0.25, large_eps=0.5) == []
    # at eps 32/255 exactly (the default end), 5% is the most left allowed; more is reported
    assert sweep_problems(rows([0.8, 0.05], [0, 32], 100)) == []
    assert sweep_problems(rows([0.8, 0.25], [0, 32], 100)) == [
        "accuracy is still 25.0% at eps 32/255 (expected about 0%)"]


def test_sweep_check_allows_one_image_left_on_a_small_sweep_and_names_the_eps_it_missed() -> None:
    def rows(accs: list[float], images: int, top: int = 32) -> list[dict]:
        return [{"eps": e / 255, "accuracy": a, "images": images} for a, e in zip(accs, [0, top], strict=True)]

    # 10 images: one right at eps 32/255 (10%) is one image's worth, above the 5% floor but allowed; two are not
    assert sweep_problems(rows([0.8, 0.1], 10)) == []
    assert sweep_problems(rows([0.8, 0.2], 10)) == ["accuracy is still 20.0% at eps 32/255 (expected about 0%)"]
    assert sweep_problems(rows([1.0, 1.0], 1)) == []  # one image: it is all the sweep can say
    assert sweep_problems(rows([0.8, 0.0], 10, top=16)) == [
        "the sweep never reaches eps 32/255, so it cannot show accuracy falling to 0"]
    assert sweep_problems(rows([0.8, 0.0], 10, top=8), large_eps=16 / 255) == [
        "the sweep never reaches eps 16/255, so it cannot show accuracy falling to 0"]


def test_correct_by_m_judges_the_rule_it_is_given_not_the_checkpoints() -> None:
    from tests.conftest import make_lively_model
    from training.robustness import answers_by_m

    model, spec = make_lively_model()  # its rule is softmax
    smooth = Smooth(model, spec.smoothing, 10)
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    vote = answers_by_m(smooth, x, [16], "vote").labels[16]
    torch.manual_seed(0)
    softmax = answers_by_m(smooth, x, [16]).labels[16]
    assert not torch.equal(vote, softmax)  # the two rules disagree somewhere on these copies
    torch.manual_seed(0)
    assert torch.equal(correct_by_m(smooth, x, vote, [16], "vote")[16], torch.ones(64, dtype=torch.bool))
    torch.manual_seed(0)
    assert torch.equal(correct_by_m(smooth, x, softmax, [16])[16], torch.ones(64, dtype=torch.bool))


def test_the_eps_sweep_judges_clean_images_at_eps_zero_without_attacking_them() -> None:
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    asked: list[float] = []

    def attack(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
        asked.append(eps)
        return a + 1  # marks what was attacked

    def judge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.tensor([bool((a == x).all())] * 2 + [False] * 2)  # right on half, only where unattacked

    rows = eps_sweep(attack, judge, x, y, [0, 8 / 255])
    assert asked == [8 / 255]
    assert [(r["eps"], r["accuracy"], r["correct"], r["images"]) for r in rows] == [
        (0, 0.5, 2, 4), (8 / 255, 0.0, 0, 4)]


def test_a_report_on_every_shipped_model_says_so_before_it_starts() -> None:
    line = report.plan_line([Path("checkpoints/a"), Path("checkpoints/b")], Path("reports/robustness"), quick=False,
                            named=False)
    assert line.startswith("robustness report for 2 checkpoint(s) (a, b) into reports/robustness/; the full preset: "
                           "several hours")
    assert line.endswith("name checkpoints to report on fewer (siam evaluate --report --quick checkpoints/<name>)")
