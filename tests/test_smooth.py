"""The smoothed classifier: shapes, independence of copies and of batch mates, aggregation, CERTIFY."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm
from torch import nn

from models import ABSTAIN, Smooth, SmoothingSpec
from models.noise import row_seed
from models.resnet import Classifier, Normalize
from models.smooth import aggregate, certify_from_counts, plan_chunks
from models.stats import clopper_pearson_lower, sign_test_p
from tests.conftest import make_model

CHUNKS = [1, 7, 64]


def linear_classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
                      nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))).eval()


class ConstantNet(nn.Module):
    """Always votes for one class, whatever the noise."""

    def __init__(self, label: int, classes: int = 10):
        super().__init__()
        self.label, self.classes = label, classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(z.shape[0], self.classes)
        out[:, self.label] = 1.0
        return out


class CoinNet(nn.Module):
    """Class 0 or 1 depending on the sign of the noise at one pixel: a fair coin per copy."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        s = z[:, 0, 0, 0]
        return torch.stack([s, -s] + [torch.full_like(s, -1e9)] * 8, dim=1)


@pytest.mark.parametrize("aggregation", ["vote", "softmax", "logits"])
def test_predictions_have_shapes_and_sum_to_one(aggregation: str) -> None:
    model, spec = make_model()
    smooth = Smooth(model, spec.smoothing, 10, chunk_rows=16)
    preds = smooth.predict_batch(torch.rand(3, 3, 32, 32), [1, 5, 40], aggregation=aggregation)
    assert [p.samples for p in preds] == [1, 5, 40]
    for p in preds:
        assert len(p.probabilities) == 10
        assert math.isclose(sum(p.probabilities), 1.0, rel_tol=1e-5)
        assert 0 <= p.label < 10 and p.probabilities[p.label] == max(p.probabilities)
        assert 0.0 < p.vote_share <= 1.0


def test_default_samples_come_from_the_spec() -> None:
    model, spec = make_model(samples=6)
    assert [p.samples for p in Smooth(model, spec.smoothing, 10).predict_batch(torch.rand(2, 3, 32, 32))] == [6, 6]


def test_variance_of_the_mean_shrinks_like_one_over_m() -> None:
    """Copies are independent draws: Var(mean of m logits) = Var(one logit) / m."""
    smooth = Smooth(linear_classifier(), SmoothingSpec(sigma=0.5), 10, chunk_rows=512)
    x = torch.rand(1, 3, 32, 32)
    groups = 400
    variances = {}
    for m in (1, 4, 16):
        logits = smooth.noisy_logits(x, [groups * m])
        variances[m] = logits.view(groups, m, 10).mean(1).var(0).mean().item()
    assert 3.0 < variances[1] / variances[4] < 5.3
    assert 3.0 < variances[4] / variances[16] < 5.3


def test_copies_of_one_image_are_distinct_draws() -> None:
    model, spec = make_model()
    logits = Smooth(model, spec.smoothing, 10).noisy_logits(torch.rand(1, 3, 32, 32), [8])
    assert torch.unique(logits[:, 0]).numel() == 8


@pytest.mark.parametrize("pni", ["none", "layer"])
def test_seeded_answers_do_not_depend_on_batch_mates_or_chunking(pni: str) -> None:
    model, spec = make_model(pni=pni)
    images = torch.rand(4, 3, 32, 32)
    alone = Smooth(model, spec.smoothing, 10, chunk_rows=5).predict_batch(images[2:3], [12], seeds=[42])[0]
    for chunk in CHUNKS:
        smooth = Smooth(model, spec.smoothing, 10, chunk_rows=chunk)
        batch = smooth.predict_batch(images, [3, 30, 12, 1], seeds=[7, None, 42, 9])
        assert batch[2].label == alone.label
        assert torch.allclose(torch.tensor(batch[2].probabilities), torch.tensor(alone.probabilities), atol=1e-5)


def test_unseeded_images_in_a_seeded_batch_still_get_fresh_noise() -> None:
    model, spec = make_model()
    smooth = Smooth(model, spec.smoothing, 10)
    x = torch.rand(1, 3, 32, 32).repeat(2, 1, 1, 1)
    a = smooth.noisy_logits(x, [4, 4], seeds=[1, None])
    b = smooth.noisy_logits(x, [4, 4], seeds=[1, None])
    assert torch.equal(a[:4], b[:4]) and not torch.allclose(a[4:], b[4:])


@pytest.mark.parametrize("aggregation", ["vote", "softmax", "logits"])
def test_aggregation_agrees_with_a_direct_loop(aggregation: str) -> None:
    """Re-derive every copy by hand (same per-copy seeds), one forward at a time, and aggregate in a loop."""
    model = linear_classifier(1)
    sigma = 0.3
    smooth = Smooth(model, SmoothingSpec(sigma=sigma, aggregation=aggregation), 10, chunk_rows=7)
    images, counts, seeds = torch.rand(3, 3, 32, 32), [5, 1, 9], [3, 4, 5]
    preds = smooth.predict_batch(images, counts, seeds=seeds)
    for image, m, seed, pred in zip(images, counts, seeds, preds, strict=True):
        outs = []
        for j in range(m):
            g = torch.Generator().manual_seed(row_seed(seed, j))
            with torch.no_grad():
                outs.append(model((image + sigma * torch.randn(image.shape, generator=g)).unsqueeze(0))[0])
        logits = torch.stack(outs)
        if aggregation == "vote":
            expected = torch.bincount(logits.argmax(1), minlength=10).float() / m
        elif aggregation == "softmax":
            expected = logits.softmax(1).mean(0)
        else:
            expected = logits.mean(0).softmax(0)
        assert torch.allclose(torch.tensor(pred.probabilities), expected, atol=1e-5)
        assert pred.label == int(expected.argmax())
        assert math.isclose(pred.vote_share, float((logits.argmax(1) == pred.label).float().mean()), rel_tol=1e-6)


def test_normalized_space_noise_is_added_after_normalizing() -> None:
    model = linear_classifier(2)
    smooth = Smooth(model, SmoothingSpec(sigma=0.2, space="normalized"), 10)
    x = torch.rand(1, 3, 32, 32)
    logits = smooth.noisy_logits(x, [2], seeds=[5])
    g = torch.Generator().manual_seed(row_seed(5, 0))
    noise = 0.2 * torch.randn(x.shape[1:], generator=g)
    with torch.no_grad():
        expected = model.net(model.normalize(x) + noise)
    assert torch.allclose(logits[0], expected[0], atol=1e-5)


def test_plan_chunks_covers_every_copy_once() -> None:
    samples = [3, 10, 1, 7]
    chunks = list(plan_chunks(samples, 4))
    assert all(sum(stop - start for _, start, stop in c) <= 4 for c in chunks)
    covered = [(i, j) for c in chunks for i, start, stop in c for j in range(start, stop)]
    assert covered == [(i, j) for i, m in enumerate(samples) for j in range(m)]


def test_aggregate_rejects_unknown_rule() -> None:
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long), 1, "median")  # type: ignore[arg-type]


def test_certify_radius_matches_hand_computation() -> None:
    """All n votes for class 3: p_lower = alpha^(1/n) (Clopper-Pearson), radius = sigma * Phi^-1(p_lower)."""
    sigma, n, alpha = 0.25, 200, 0.001
    model = Classifier(Normalize((0, 0, 0), (1, 1, 1)), ConstantNet(3)).eval()
    cert = Smooth(model, SmoothingSpec(sigma=sigma), 10).certify(torch.rand(3, 32, 32), 10, n, alpha, seed=0)
    p_lower = alpha ** (1 / n)
    assert cert.label == 3 and not cert.abstained
    assert cert.counts[3] == n
    assert math.isclose(cert.p_lower, p_lower, rel_tol=1e-9)
    assert math.isclose(cert.radius, sigma * norm.ppf(p_lower), rel_tol=1e-9)


def test_certify_and_predict_abstain_on_a_coin_flip() -> None:
    model = Classifier(Normalize((0, 0, 0), (1, 1, 1)), CoinNet()).eval()
    smooth = Smooth(model, SmoothingSpec(sigma=0.5), 10)
    x = torch.zeros(3, 32, 32)  # the pixel CoinNet reads is pure noise
    cert = smooth.certify(x, 20, 400, 0.001, seed=1)
    assert cert.abstained and cert.radius == 0.0
    assert 150 < cert.counts[0] < 250  # a fair coin, not a constant
    assert smooth.predict(x, 400, 0.001, seed=2) == ABSTAIN
    constant = Smooth(Classifier(Normalize((0, 0, 0), (1, 1, 1)), ConstantNet(7)).eval(), SmoothingSpec(), 10)
    assert constant.predict(x, 50, 0.001) == 7


class RecordingNet(nn.Module):
    """Votes class 0 and keeps every noisy input it was shown."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.seen.append(z.detach().clone())
        return torch.nn.functional.one_hot(torch.zeros(z.shape[0], dtype=torch.long), 10).float()


@pytest.mark.parametrize("seed", [None, 5])
def test_certify_estimation_copies_are_independent_of_the_selection_copies(seed: int | None) -> None:
    """Cohen's bound holds only if the n estimation copies are fresh draws, not the n0 selection copies
    again (with a seed, the two stages must use different streams)."""
    net = RecordingNet()
    smooth = Smooth(Classifier(Normalize((0, 0, 0), (1, 1, 1)), net).eval(), SmoothingSpec(sigma=0.5), 10,
                    chunk_rows=1000)
    smooth.certify(torch.rand(3, 32, 32), 16, 16, 0.001, seed=seed)
    selection, estimation = torch.cat(net.seen[: len(net.seen) // 2]), torch.cat(net.seen[len(net.seen) // 2:])
    assert selection.shape == estimation.shape == (16, 3, 32, 32)
    distance = (selection[:, None] - estimation[None]).flatten(2).abs().amax(2)  # every pair of copies
    assert distance.min() > 0.1, "an estimation copy repeats a selection copy's noise"


def test_seeded_cohen_procedures_are_reproducible_and_their_stages_use_the_documented_streams() -> None:
    coin = Smooth(Classifier(Normalize((0, 0, 0), (1, 1, 1)), CoinNet()).eval(), SmoothingSpec(sigma=0.5), 10)
    x = torch.zeros(3, 32, 32)
    counts = coin.class_counts(x, 64, seed=3)
    assert counts.shape == (10,) and int(counts.sum()) == 64  # every class has a count, even with no votes
    assert torch.equal(counts, coin.class_counts(x, 64, seed=3))
    assert not torch.equal(counts, coin.class_counts(x, 64, seed=4))  # 64 fair coins: equal by chance ~1%
    cert = coin.certify(x, 16, 64, 0.4, seed=5)
    assert cert.counts == coin.class_counts(x, 64, seed=6).tolist()  # estimation: seed + 1
    assert coin.certify(x, 16, 64, 0.4, seed=5) == cert
    # selection on seed 5: the certificate's class is the selection's top class (when it does not abstain)
    selection = coin.class_counts(x, 16, seed=5)
    wide = coin.certify(x, 16, 64, 0.49, seed=5)
    assert wide.abstained or wide.label == int(selection.argmax())
    assert coin.predict(x, 64, 0.4, seed=9) == coin.predict(x, 64, 0.4, seed=9)
    assert {coin.predict(x, 200, 0.5, seed=s) for s in range(12)} - {ABSTAIN} <= {0, 1}


def test_clopper_pearson_lower_bound_is_zero_only_without_successes() -> None:
    from scipy.stats import beta

    from models.smooth import clopper_pearson_lower

    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    assert clopper_pearson_lower(1, 10, 0.05) == pytest.approx(beta.ppf(0.05, 1, 10)) and \
        clopper_pearson_lower(1, 10, 0.05) > 0
    assert clopper_pearson_lower(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10))


def test_forward_noisy_adds_sigma_times_one_draw_per_row_in_the_rows_dtype() -> None:
    """The attacks' and training's view of the model: x + sigma * N(0, I) per row, drawn from the given
    generator in the rows' own dtype, and differentiable."""
    model = linear_classifier(3).double()
    smooth = Smooth(model, SmoothingSpec(sigma=0.3), 10)
    rows = torch.rand(5, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    out = smooth.forward_noisy(rows, torch.Generator().manual_seed(11))
    noise = torch.randn((5, 3, 32, 32), dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = model(rows + 0.3 * noise)
    assert out.dtype == torch.float64 and torch.equal(out.detach(), expected)
    out[:, 0].sum().backward()
    assert rows.grad is not None and torch.allclose(rows.grad[0], rows.grad[4])  # a linear model's gradient


def test_pni_weight_noise_is_drawn_per_copy_unless_asked_per_forward() -> None:
    """Serving gives every copy its own PNI weight draw; ``per_row_weight_noise=False`` keeps PNI's
    training behaviour, one weight draw for the whole forward (here sigma = 0, so only weights vary)."""
    model, spec = make_model(pni="layer", sigma=0.0)
    rows = torch.rand(1, 3, 32, 32).repeat(6, 1, 1, 1)
    with torch.no_grad():
        per_copy = Smooth(model, spec.smoothing, 10).forward_noisy(rows)
        per_forward = Smooth(model, spec.smoothing, 10, per_row_weight_noise=False).forward_noisy(rows)
    assert torch.unique(per_copy[:, 0]).numel() == 6
    assert torch.allclose(per_forward, per_forward[:1].expand_as(per_forward))
    assert not torch.allclose(per_forward[0], Smooth(model, spec.smoothing, 10, per_row_weight_noise=False)
                              .forward_noisy(rows[:1]).detach()[0])  # a new weight draw each forward


def test_noisy_logits_of_no_images_is_empty_and_mismatched_counts_are_refused() -> None:
    smooth = Smooth(linear_classifier(), SmoothingSpec(sigma=0.1), 10)
    assert smooth.noisy_logits(torch.rand(0, 3, 32, 32), []).shape == (0, 10)
    with pytest.raises(ValueError, match=r"^2 sample counts for 4 images$"):
        smooth.noisy_logits(torch.rand(4, 3, 32, 32), [1, 2])
    for samples in ([1, 2], [1, 0, 3]):
        with pytest.raises(ValueError, match=r"^need one sample count >= 1 per image$"):
            smooth.predict_batch(torch.rand(3, 3, 32, 32), samples)
    with pytest.raises(ValueError, match=r"^chunk_rows must be >= 1$"):
        list(plan_chunks([1], 0))


def test_predict_decides_when_the_sign_test_p_equals_alpha_and_works_with_two_classes() -> None:
    """Cohen's PREDICT abstains only when p > alpha; ten votes out of ten give p = 2 / 2^10 exactly."""
    model = Classifier(Normalize((0, 0, 0), (1, 1, 1)), ConstantNet(1, classes=2)).eval()
    smooth = Smooth(model, SmoothingSpec(sigma=0.5), 2)
    x = torch.rand(3, 32, 32)
    alpha = sign_test_p(10, 10)
    assert alpha == 2 / 2 ** 10
    assert smooth.predict(x, 10, alpha) == 1
    assert smooth.predict(x, 10, alpha * 0.99) == ABSTAIN


def test_an_abstaining_certificate_still_reports_its_bound_and_counts() -> None:
    """The selection picks the class; its lower bound comes from the estimation counts, even when it is
    below one half."""
    cert = certify_from_counts(torch.tensor([1, 3, 0]), torch.tensor([30, 25, 5]), 0.001, 0.5)
    assert cert.abstained and cert.radius == 0.0 and cert.counts == [30, 25, 5]
    assert cert.p_lower == clopper_pearson_lower(25, 60, 0.001)
