"""Property-based tests (hypothesis) of the pure functions the answers are built from: how copies are cut
into chunks, the three aggregation rules, and the KServe request reader, which any body either passes
as a checked request or refuses with a 4xx, never anything else."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from models.smooth import aggregate, plan_chunks, rows_of_chunk, summarize
from models.spec import ModelSpec, SmoothingSpec
from service.backends import chunk_bounds
from service.images import InputError
from service.kserve import read_infer
from service.settings import Settings

# --- plan_chunks -------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=12), st.integers(1, 50))
def test_plan_chunks_cuts_every_copy_once_in_order(samples: list[int], chunk_rows: int) -> None:
    chunks = list(plan_chunks(samples, chunk_rows))
    sizes = [sum(stop - start for _, start, stop in chunk) for chunk in chunks]
    # every chunk but the last is exactly full (fewest forward passes), none is empty or too big
    assert all(size == chunk_rows for size in sizes[:-1])
    assert all(1 <= size <= chunk_rows for size in sizes)
    assert all(start < stop for chunk in chunks for _, start, stop in chunk)
    covered = [(image, j) for chunk in chunks for image, start, stop in chunk for j in range(start, stop)]
    assert covered == [(image, j) for image, m in enumerate(samples) for j in range(m)]
    assert len(chunks) == math.ceil(sum(samples) / chunk_rows)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=8), st.integers(1, 20))
def test_a_chunks_rows_are_its_images_repeated_once_per_copy_in_order(samples: list[int], chunk_rows: int) -> None:
    images = torch.arange(len(samples), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    for chunk in plan_chunks(samples, chunk_rows):
        rows = rows_of_chunk(images, chunk)
        assert rows[:, 0, 0, 0].tolist() == [float(image) for image, start, stop in chunk for _ in range(start, stop)]
        assert rows.shape[1:] == images.shape[1:]


@given(st.integers(-5, 0))
def test_plan_chunks_refuses_chunks_without_room(chunk_rows: int) -> None:
    with pytest.raises(ValueError, match="chunk_rows"):
        list(plan_chunks([3], chunk_rows))


# --- chunk_bounds: one call's rows shared by a pool of one-thread ONNX Runtime calls ----------------------


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 300), st.integers(1, 16))
@example(rows=64, size=16, workers=4)  # exactly a chunk per thread: still one share each
def test_chunk_bounds_cut_every_row_once_in_order_and_end_in_small_chunks(rows: int, size: int, workers: int) -> None:
    bounds = chunk_bounds(rows, size, workers)
    assert [b for _, b in bounds[:-1]] == [a for a, _ in bounds[1:]] and bounds[0][0] == 0 and bounds[-1][1] == rows
    sizes = [stop - start for start, stop in bounds]
    assert all(1 <= n <= size for n in sizes)
    assert sizes == sorted(sizes, reverse=True)  # largest first: the threads meet at the end, a small chunk apart
    if rows <= size * workers:  # one equal share per thread (the last may be short)
        assert len(bounds) <= workers and max(sizes) - min(sizes[:-1] or sizes) == 0
    elif workers > 1:  # the tail is a quarter chunk or less, and no chunk before it is smaller (few calls)
        assert sizes[-1] <= max(1, size // 4) and min(sizes[:-1]) >= max(1, size // 4)
    else:  # one thread: whole chunks, fewest calls
        assert sizes[:-1] == [size] * (len(sizes) - 1)


# --- aggregation ---------------------------------------------------------------------------------------

logits_values = st.floats(-30, 30, allow_nan=False, width=32)


@st.composite
def copies(draw: st.DrawFn) -> tuple[torch.Tensor, list[int]]:
    """Logits of a few images' noisy copies, consecutive per image, as the engine hands them over."""
    counts = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    classes = draw(st.integers(2, 5))
    values = draw(st.lists(logits_values, min_size=sum(counts) * classes, max_size=sum(counts) * classes))
    return torch.tensor(values, dtype=torch.float32).reshape(sum(counts), classes), counts


def by_hand(logits: torch.Tensor, counts: list[int], rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rules as the paper states them, one image at a time."""
    scores, votes = [], []
    for part in logits.split(counts):
        vote = torch.bincount(part.argmax(1), minlength=part.shape[1]).float()
        votes.append(vote)
        if rule == "vote":
            scores.append(vote / len(part))
        elif rule == "softmax":
            scores.append(part.softmax(1).mean(0))
        else:
            scores.append(part.mean(0).softmax(0))
    return torch.stack(scores), torch.stack(votes)


@settings(max_examples=300, deadline=None)
@given(copies(), st.sampled_from(["vote", "softmax", "logits"]))
def test_aggregation_rules_match_the_per_image_definition(case: tuple[torch.Tensor, list[int]], rule: str) -> None:
    logits, counts = case
    image_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    scores, votes = aggregate(logits, image_of_row, len(counts), rule)  # type: ignore[arg-type]
    want_scores, want_votes = by_hand(logits, counts, rule)
    assert torch.equal(votes, want_votes)
    assert torch.allclose(scores, want_scores, atol=1e-5)
    assert torch.allclose(scores.sum(1), torch.ones(len(counts)), atol=1e-5)
    for prediction, m, want, vote in zip(summarize(logits, counts, rule), counts, want_scores, want_votes,  # type: ignore[arg-type]
                                         strict=True):
        assert prediction.samples == m
        assert prediction.probabilities == pytest.approx(want.tolist(), abs=1e-5)
        assert prediction.vote_share == pytest.approx(float(vote[prediction.label]) / m)


@st.composite
def equal_copies(draw: st.DrawFn) -> tuple[torch.Tensor, list[int]]:
    """Logits of a few images with the same number of copies each: a serving request's images."""
    images, m, classes = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(2, 5))
    values = draw(st.lists(logits_values, min_size=images * m * classes, max_size=images * m * classes))
    return torch.tensor(values, dtype=torch.float32).reshape(images * m, classes), [m] * images


@settings(max_examples=300, deadline=None)
@given(equal_copies(), st.sampled_from(["vote", "softmax", "logits"]))
def test_equal_copy_counts_take_a_shorter_path_to_the_same_answers(case: tuple[torch.Tensor, list[int]],
                                                                   rule: str) -> None:
    """summarize sums each image's rows with a reshape when every image has m copies (a request's images),
    with np.add.reduceat otherwise: both are checked against the definition, and against aggregate, the
    differentiable torch version that attacks use."""
    logits, counts = case
    want_scores, want_votes = by_hand(logits, counts, rule)
    image_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    torch_scores, _ = aggregate(logits, image_of_row, len(counts), rule)  # type: ignore[arg-type]
    for prediction, want, vote, from_torch in zip(summarize(logits, counts, rule), want_scores, want_votes,  # type: ignore[arg-type]
                                                  torch_scores, strict=True):
        assert prediction.probabilities == pytest.approx(want.tolist(), abs=1e-5)
        assert prediction.probabilities == pytest.approx(from_torch.tolist(), abs=1e-6)
        assert float(want[prediction.label]) >= float(want.max()) - 1e-5  # the top class (ties either way)
        assert prediction.vote_share == pytest.approx(float(vote[prediction.label]) / counts[0])
        assert prediction.samples == counts[0]


def test_no_images_summarize_to_no_answers() -> None:
    for rule in ("vote", "softmax", "logits"):
        assert summarize(torch.zeros(0, 10), [], rule) == []  # type: ignore[arg-type]


def test_summaries_refuse_an_unknown_rule() -> None:
    for counts in ([2], [1, 1]):
        with pytest.raises(ValueError, match=r"^unknown aggregation 'median'; expected vote, softmax or logits$"):
            summarize(torch.zeros(2, 10), counts, "median")  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(copies(), st.permutations(range(4)))
def test_aggregation_does_not_depend_on_row_order(case: tuple[torch.Tensor, list[int]], order: list[int]) -> None:
    """Rows may reach ``aggregate`` in any order as long as each says its image (chunking, rounds)."""
    logits, counts = case
    image_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    shuffle = torch.randperm(len(logits), generator=torch.Generator().manual_seed(sum(order)))
    for rule in ("vote", "softmax", "logits"):
        a = aggregate(logits, image_of_row, len(counts), rule)  # type: ignore[arg-type]
        b = aggregate(logits[shuffle], image_of_row[shuffle], len(counts), rule)  # type: ignore[arg-type]
        assert torch.equal(a[1], b[1])
        assert torch.allclose(a[0], b[0], atol=1e-5)


# --- the KServe request reader ---------------------------------------------------------------------------

SPEC = ModelSpec(smoothing=SmoothingSpec(sigma=0.25, default_samples=8))
SETTINGS = Settings(max_samples=64, max_images=4, allow_seed=True)
SIZE = SPEC.architecture.input_size

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


BAD_PARAMETERS = [
    ("samples", 0), ("samples", SETTINGS.max_samples + 1), ("samples", 1.0), ("samples", True),
    ("samples", "many"), ("samples", None), ("aggregation", "median"), ("aggregation", 1),
    ("seed", -1), ("seed", 2**63), ("seed", 1.5), ("seed", True), ("seed", "7"),
    ("confidence", 0.5), ("confidence", 1.0), ("confidence", 1), ("confidence", True), ("confidence", "high"),
]
EDGE_PARAMETERS = [("samples", 1), ("samples", SETTINGS.max_samples), ("seed", 0), ("seed", 2**63 - 1),
                   ("confidence", 0.5000001), ("confidence", 0.9999999), ("aggregation", "vote")]


@st.composite
def near_valid_requests(draw: st.DrawFn) -> tuple[dict, set[str]]:
    """Valid requests, and the same with one or two fields made wrong (and the names of those)."""
    field = draw(st.sampled_from(["", "datatype", "shape", "data", "parameters", "outputs"]))
    broken = {field} - {""}
    datatype = draw(st.sampled_from(["FP32", "UINT8"]))
    if "datatype" in broken:
        datatype = draw(st.sampled_from(["FP64", "INT64", "", "fp32"]))
    n = draw(st.integers(1, SETTINGS.max_images))
    shape = [n, 3, SIZE, SIZE] if datatype == "FP32" else [n, SIZE, SIZE, 3]
    if "shape" in broken:
        shape = draw(st.sampled_from([[0, 3, SIZE, SIZE], [SETTINGS.max_images + 1, 3, SIZE, SIZE], [n, 3, 2, 2],
                                      [n], [], [n, 3, SIZE, SIZE, 1], [-1, 3, SIZE, SIZE], [2**40, 3, SIZE, SIZE]]))
    count = math.prod(shape) if all(d >= 0 for d in shape) and math.prod(shape) <= 20_000 else 3
    fill: object = draw(st.sampled_from([0, 0.5, 1]) if datatype == "FP32" else st.integers(0, 255))
    data: object = [fill] * count
    if "data" in broken:
        bad = draw(st.sampled_from([-0.1, 1.5, 255, float("inf")] if datatype == "FP32" else [256, -1, 1.5, 2**70])
                   | st.sampled_from(["0", None, True, float("nan")]))
        data = draw(st.sampled_from([[bad] * count, [fill] * (count - 1), [fill] * count + [fill], fill,
                                     [[fill] * 2], None]))
    parameters = {"samples": draw(st.integers(1, SETTINGS.max_samples)),
                  "aggregation": draw(st.sampled_from(["vote", "softmax", "logits"]))}
    if draw(st.booleans()):
        parameters["confidence"] = draw(st.floats(0.51, 0.9999))
    if draw(st.booleans()):
        parameters["seed"] = draw(st.integers(0, 2**63 - 1))
    if "parameters" in broken:
        key, value = draw(st.sampled_from(BAD_PARAMETERS))
        parameters[key] = value
    request: dict = {"inputs": [{"name": "images", "datatype": datatype, "shape": shape, "data": data}],
                     "parameters": parameters}
    names = ["probabilities", "label", "vote_share"] + (["samples_used"] if "confidence" in parameters else [])
    if "outputs" in broken:
        request["outputs"] = draw(st.sampled_from([[{"name": "nope"}], [{"name": "logits"}], [{"a": 1}],
                                                   {"a": 1}, "x"]))
    elif draw(st.booleans()):
        request["outputs"] = [{"name": name, "parameters": {"binary_data": draw(st.booleans())}}
                              for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True))]
    return request, broken


def check_reading(body: bytes, header: str | None = None, valid: bool | None = None) -> None:
    """Either a request the engine can run as is, or a client error with a 4xx status; a request known to
    be ``valid`` (True) must pass, one known to be broken (False) must be refused."""
    try:
        call = read_infer(body, header, SPEC, SETTINGS)
    except InputError as e:
        assert valid is not True, f"a valid request was refused: {e}"
        assert 400 <= e.status < 500 and str(e)
        return
    assert valid is not False, "a broken request was accepted"
    images = call.images
    assert images.dtype == torch.float32 and images.ndim == 4 and images.shape[1:] == (3, SIZE, SIZE)
    assert 1 <= images.shape[0] <= SETTINGS.max_images
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert 1 <= call.samples <= SETTINGS.max_samples
    assert call.aggregation in ("vote", "softmax", "logits")
    assert call.seed is None or 0 <= call.seed < 2**63
    assert call.confidence is None or 0.5 < call.confidence < 1
    assert call.outputs and set(call.outputs) <= {"probabilities", "label", "vote_share", "samples_used", "decided"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_valid_requests())
def test_kserve_reader_accepts_valid_and_refuses_broken_requests(case: tuple[dict, set[str]]) -> None:
    request, broken = case
    check_reading(json.dumps(request).encode(), valid=not broken)
    if not broken:  # and its parameters reach the engine as sent
        call = read_infer(json.dumps(request).encode(), None, SPEC, SETTINGS)
        params = request["parameters"]
        assert (call.samples, call.aggregation) == (params["samples"], params["aggregation"])
        assert (call.seed, call.confidence) == (params.get("seed"), params.get("confidence"))
        assert call.images.shape[0] == request["inputs"][0]["shape"][0]


@pytest.mark.parametrize(("key", "value", "valid"), [(*kv, False) for kv in BAD_PARAMETERS]
                         + [(*kv, True) for kv in EDGE_PARAMETERS])
def test_kserve_parameters_at_their_bounds(key: str, value: object, valid: bool) -> None:
    request = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, SIZE, SIZE, 3],
                           "data": [7] * (SIZE * SIZE * 3)}], "parameters": {key: value}}
    body = json.dumps(request).encode()
    check_reading(body, valid=valid)
    if not valid:
        with pytest.raises(InputError) as e:
            read_infer(body, None, SPEC, SETTINGS)
        says = {"samples": "samples must be", "aggregation": "aggregation must be one of vote, softmax, logits",
                "seed": "parameter seed must be an integer in [0, 2^63)",
                "confidence": "parameter confidence must be a number in (0.5, 1)"}[key]
        assert (e.value.status, e.value.kind) == (422, "bad_request") and says in str(e.value)


def test_kserve_seed_is_refused_with_403_where_the_server_does_not_allow_it() -> None:
    body = json.dumps(u8_request(parameters={"seed": 3})).encode()
    with pytest.raises(InputError, match=r"seed is disabled on this server \(SIAM_ALLOW_SEED=true enables it\)") as e:
        read_infer(body, None, SPEC, Settings(max_samples=64, max_images=4, allow_seed=False))
    assert e.value.status == 403


@pytest.mark.parametrize(("datatype", "value", "refusal"), [
    ("UINT8", 0, None), ("UINT8", 255, None), ("UINT8", 255.0, None),
    ("UINT8", 256, (400, "whole numbers in [0, 255]")), ("UINT8", -1, (400, "whole numbers in [0, 255]")),
    ("UINT8", 1.5, (400, "whole numbers in [0, 255]")), ("UINT8", True, (400, "not a list of UINT8 numbers")),
    ("UINT8", "7", (400, "not a list of UINT8 numbers")), ("UINT8", None, (400, "not a list of UINT8 numbers")),
    ("FP32", 0, None), ("FP32", 1, None), ("FP32", 0.25, None),
    ("FP32", 1.0001, (422, "must be in [0, 1]")), ("FP32", -0.0001, (422, "must be in [0, 1]")),
    ("FP32", 1e39, (422, "NaN or infinite")), ("FP32", True, (400, "not a list of FP32 numbers")),
    ("FP32", "0.5", (400, "not a list of FP32 numbers"))])
def test_kserve_tensor_values_at_their_bounds(datatype: str, value: object, refusal: tuple[int, str] | None) -> None:
    shape = [1, 3, SIZE, SIZE] if datatype == "FP32" else [1, SIZE, SIZE, 3]
    data = [value] * (SIZE * SIZE * 3)
    body = json.dumps({"inputs": [{"name": "images", "datatype": datatype, "shape": shape, "data": data}]}).encode()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an FP32 overflow is refused, not also logged as a numpy warning
        check_reading(body, valid=refusal is None)
        if refusal is not None:
            with pytest.raises(InputError) as e:
                read_infer(body, None, SPEC, SETTINGS)
            assert (e.value.status, e.value.kind) == (refusal[0], "bad_request") and refusal[1] in str(e.value)


def test_kserve_ragged_or_missing_data_is_a_400() -> None:
    for data in ([[0.5, 0.5], [0.5]], None, {"a": 1}):
        body = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE],
                                       "data": data}]}).encode()
        with pytest.raises(InputError, match="not a list of FP32 numbers") as e:
            read_infer(body, None, SPEC, SETTINGS)
        assert e.value.status == 400


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_kserve_reader_accepts_or_refuses_any_json(value: object) -> None:
    check_reading(json.dumps(value).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.none() | st.text(max_size=6) | st.integers(-3, 80).map(str))
def test_kserve_reader_accepts_or_refuses_any_bytes_and_header(body: bytes, header: str | None) -> None:
    check_reading(body, header)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.sampled_from(["FP32", "UINT8"]), st.integers(-8, 8))
def test_kserve_binary_tail_must_match_the_shape(n: int, datatype: str, skew: int) -> None:
    """With the binary extension the tail is read as the tensor only when its size says exactly that."""
    shape = [n, 3, SIZE, SIZE] if datatype == "FP32" else [n, SIZE, SIZE, 3]
    dtype = np.float32 if datatype == "FP32" else np.uint8
    tail = np.full(math.prod(shape), 0.5 if datatype == "FP32" else 128, dtype=dtype).tobytes()
    tail = tail[:len(tail) + skew] if skew < 0 else tail + b"\0" * skew
    head = json.dumps({"inputs": [{"name": "images", "datatype": datatype, "shape": shape,
                                   "parameters": {"binary_data_size": len(tail)}}]}).encode()
    if skew == 0:
        call = read_infer(head + tail, str(len(head)), SPEC, SETTINGS)
        assert call.images.shape == (n, 3, SIZE, SIZE)
        assert torch.allclose(call.images, torch.full_like(call.images, 0.5 if datatype == "FP32" else 128 / 255))
    else:
        with pytest.raises(InputError, match="binary_data_size") as e:
            read_infer(head + tail, str(len(head)), SPEC, SETTINGS)
        assert e.value.status == 400


def u8_request(**extra: object) -> dict:
    data = [7] * (SIZE * SIZE * 3)
    return {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, SIZE, SIZE, 3], "data": data}], **extra}


@pytest.mark.parametrize(("default", "outputs", "want"), [
    (None, None, {"probabilities": False, "label": False, "vote_share": False}),
    (True, None, {"probabilities": True, "label": True, "vote_share": True}),
    (False, [{"name": "label", "parameters": {"binary_data": True}}, {"name": "probabilities"}],
     {"label": True, "probabilities": False}),
    (True, [{"name": "vote_share", "parameters": {"binary_data": False}}, {"name": "label"},
            {"name": "probabilities", "parameters": {}}],
     {"vote_share": False, "label": True, "probabilities": True}),
])
def test_kserve_outputs_are_binary_per_output_else_by_the_request_default(
        default: bool | None, outputs: list | None, want: dict[str, bool]) -> None:
    request = u8_request(parameters={} if default is None else {"binary_data_output": default})
    if outputs is not None:
        request["outputs"] = outputs
    assert read_infer(json.dumps(request).encode(), None, SPEC, SETTINGS).outputs == want


def test_kserve_unknown_output_names_the_known_ones() -> None:
    body = json.dumps(u8_request(outputs=[{"name": "logits"}])).encode()
    known = r"unknown output 'logits'; outputs are probabilities, label, vote_share$"
    with pytest.raises(InputError, match=known) as e:
        read_infer(body, None, SPEC, SETTINGS)
    assert e.value.status == 400


@pytest.mark.parametrize(("datatype", "shape", "status", "kind", "message"), [
    ("FP32", [1, 3, 8, 8], 422, "bad_request", "FP32 input must have shape [N, 3, 32, 32], got [1, 3, 8, 8]"),
    ("UINT8", [1, 3, 32, 32], 422, "bad_request", "UINT8 input must have shape [N, 32, 32, 3], got [1, 3, 32, 32]"),
    ("FP32", [9], 422, "bad_request", "FP32 input must have shape [N, 3, 32, 32] with N <= 4, got [9]"),
    ("UINT8", [9], 422, "bad_request", "UINT8 input must have shape [N, 32, 32, 3] with N <= 4, got [9]"),
    ("FP32", [4, 4, 32, 32], 422, "bad_request", "with N <= 4"),  # refused from the shape, before any data is read
    ("FP32", [5, 3, 32, 32], 413, "payload_too_large", "with N <= 4"),
    ("UINT8", [5, 32, 32, 3], 413, "payload_too_large", "with N <= 4"),
])
def test_kserve_shape_refusals(datatype: str, shape: list[int], status: int, kind: str, message: str) -> None:
    data = [0] * math.prod(shape) if math.prod(shape) <= 3 * SIZE * SIZE else None
    body = json.dumps({"inputs": [{"name": "images", "datatype": datatype, "shape": shape, "data": data}]}).encode()
    with pytest.raises(InputError) as e:
        read_infer(body, None, SPEC, SETTINGS)
    assert (e.value.status, e.value.kind) == (status, kind) and message in str(e.value)


def test_kserve_takes_exactly_max_images() -> None:
    n = SETTINGS.max_images
    request = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [n, SIZE, SIZE, 3],
                           "data": [1] * (n * SIZE * SIZE * 3)}]}
    assert read_infer(json.dumps(request).encode(), None, SPEC, SETTINGS).images.shape[0] == n


@pytest.mark.parametrize("size", [True, 3072.0, "3072"])
def test_kserve_binary_data_size_must_be_an_integer(size: object) -> None:
    shape = [1, 1, 1, 1] if size is True else [1, SIZE, SIZE, 3]
    tail = b"\x07" * math.prod(shape)
    head = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": shape,
                                   "parameters": {"binary_data_size": size}}]}).encode()
    with pytest.raises(InputError, match="binary_data_size") as e:
        read_infer(head + tail, str(len(head)), SPEC, SETTINGS)
    assert e.value.status == 400


def test_kserve_header_length_and_empty_bodies() -> None:
    head = json.dumps(u8_request()).encode()
    assert read_infer(head, str(len(head)), SPEC, SETTINGS).images.shape[0] == 1  # the header may cover it all
    for header in (str(len(head) + 1), "-1", "1e3", "9" * 13):
        with pytest.raises(InputError, match=r"inference-header-content-length .* does not fit a body of") as e:
            read_infer(head, header, SPEC, SETTINGS)
        assert e.value.status == 400
    for body, header in ((b"", None), (head, "0")):
        with pytest.raises(InputError, match="empty body: send an inference request") as e:
            read_infer(body, header, SPEC, SETTINGS)
        assert e.value.status == 400


def test_kserve_binary_data_size_without_the_header_has_no_tail_to_read() -> None:
    request = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 1, 2, 2],
                           "parameters": {"binary_data_size": 4}}]}
    with pytest.raises(InputError, match=r"binary_data_size 4 does not match .* and the 0 bytes sent") as e:
        read_infer(json.dumps(request).encode(), None, SPEC, SETTINGS)
    assert e.value.status == 400
