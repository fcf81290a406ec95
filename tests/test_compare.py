"""``siam compare``: two evaluations paired image by image, and the pairings it must refuse."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from training import evaluate
from training.compare import NotComparableError, compare, main, to_markdown


@pytest.fixture
def report(tiny_checkpoint: Path, tiny_cifar_tar: Path, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "eval"
    evaluate.main([str(tiny_checkpoint), "--data", str(tiny_cifar_tar), "--cache-dir", str(tmp_path / "c"),
                   "--images", "12", "--samples", "1,4", "--attacks", "clean,pgd", "--steps", "1",
                   "--output", str(out), "--threads", "1"])
    return json.loads((out / "eval.json").read_text())


def flipped(report: dict[str, Any], attack: str, m: int, images: list[int]) -> dict[str, Any]:
    """The same evaluation with the answers on ``images`` turned from right to wrong or back."""
    other = copy.deepcopy(report)
    other["model"] = "other"
    for row in other["results"]:
        if (row["attack"], row["samples"]) == (attack, m):
            bits = list(row["per_image"])
            for i in images:
                bits[i] = "0" if bits[i] == "1" else "1"
            row["per_image"] = "".join(bits)
            row["correct"] = bits.count("1")
            row["accuracy"] = row["correct"] / len(bits)
    return other


def test_every_result_keeps_its_per_image_answers(report: dict[str, Any]) -> None:
    for row in report["results"]:
        assert len(row["per_image"]) == report["data"]["images"] == 12
        assert set(row["per_image"]) <= {"0", "1"}
        assert row["per_image"].count("1") == row["correct"]


def test_a_model_against_itself_gains_and_loses_nothing(report: dict[str, Any]) -> None:
    rows = compare(report, report)
    assert {(r["attack"], r["samples"]) for r in rows} == {(a, m) for a in ("clean", "pgd") for m in (1, 4)}
    assert all(r["difference"] == 0 and r["gained"] == r["lost"] == 0 for r in rows)


def test_the_difference_counts_the_images_that_changed(report: dict[str, Any]) -> None:
    bits = next(r["per_image"] for r in report["results"] if (r["attack"], r["samples"]) == ("pgd", 4))
    changed = [0, 3, 7, 8, 11]
    gained = sum(bits[i] == "0" for i in changed)
    rows = {(r["attack"], r["samples"]): r for r in compare(report, flipped(report, "pgd", 4, changed))}
    r = rows["pgd", 4]
    assert (r["gained"], r["lost"]) == (gained, len(changed) - gained)
    assert r["difference"] == pytest.approx((2 * gained - len(changed)) / 12)
    assert r["second"] - r["first"] == pytest.approx(r["difference"])
    assert r["ci95"][0] < r["difference"] < r["ci95"][1]
    assert rows["pgd", 1]["gained"] == rows["pgd", 1]["lost"] == 0  # the other rows are untouched


@pytest.mark.parametrize("change, message", [
    (lambda r: r["data"].update(subset_seed=1), "not the same test images"),
    (lambda r: r["data"].update(sha256="0" * 64), "not the same test images"),
    (lambda r: r["attack"].update(steps=7), "not the same attacks: steps 1 against 7"),
    (lambda r: [row.pop("per_image") for row in r["results"]], "no per-image results"),
    (lambda r: [row.update(attack={"clean": "eot", "pgd": "adaptive"}[row["attack"]]) for row in r["results"]],
     "no attack and m in common"),
    (lambda r: r["results"].extend(dict(row, sigma=0.5) for row in list(r["results"])), "several sigmas"),
    (lambda r: r["results"].extend(dict(row, aggregation="vote") for row in list(r["results"])),
     "several aggregation rules"),
])
def test_it_refuses_what_cannot_be_paired(report: dict[str, Any], change: Any, message: str) -> None:
    other = copy.deepcopy(report)
    change(other)
    with pytest.raises(NotComparableError, match=message):
        compare(report, other)


def test_two_rules_of_one_evaluation_pair_like_two_models(report: dict[str, Any], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    vote = flipped(report, "pgd", 4, [0, 1, 2])
    both = copy.deepcopy(report)
    both["results"] += [dict(row, aggregation="vote") for row in vote["results"]]
    path = tmp_path / "both.json"
    path.write_text(json.dumps(both))
    main([str(path), str(path), "--rules", "softmax,vote"])
    out = capsys.readouterr().out
    assert "### tiny (vote) against tiny (softmax)" in out
    changed = compare(report, vote)
    row = next(r for r in changed if (r["attack"], r["samples"]) == ("pgd", 4))
    low, high = row["ci95"]
    assert (f"| pgd | 4 | {100 * row['first']:.1f} | {100 * row['second']:.1f} | {100 * row['difference']:+.1f} "
            f"[{100 * low:+.1f}, {100 * high:+.1f}] | {row['gained']} / {row['lost']} |") in out
    with pytest.raises(SystemExit, match="no results under the logits rule"):
        main([str(path), str(path), "--rules", "softmax,logits"])
    with pytest.raises(SystemExit, match="several aggregation rules: pick one for each side with --rules"):
        main([str(path), str(path)])


def test_the_command_prints_and_writes_the_table(report: dict[str, Any], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "a" / "eval.json", tmp_path / "b.json"
    first.parent.mkdir()
    first.write_text(json.dumps(report))
    second.write_text(json.dumps(flipped(report, "clean", 1, [2])))
    main([str(first.parent), str(second), "--output", str(tmp_path / "out.md")])
    printed = capsys.readouterr().out
    assert "### other against tiny: paired on the same 12 test images" in printed
    assert "| clean | 1 |" in printed and (tmp_path / "out.md").read_text() == printed
    second.write_text(json.dumps({**report, "data": {**report["data"], "images": 13}}))
    with pytest.raises(SystemExit, match="siam compare: not the same test images"):
        main([str(first), str(second)])


def test_settings_of_an_attack_neither_ran_do_not_block_the_pairing(report: dict[str, Any]) -> None:
    """Every eval.json records APGD's and EOT's settings; they matter only where those attacks ran."""
    other = copy.deepcopy(report)
    other["model"] = "other"
    other["attack"].update(apgd_eot=5, apgd_steps=50, eot_draws=3, adaptive_samples=4)
    assert {(r["attack"], r["samples"]) for r in compare(report, other)} == {
        (a, m) for a in ("clean", "pgd") for m in (1, 4)}


def with_attacks(report: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """The evaluation with more attacks (copies of its PGD rows under other names) and its worst case."""
    out = copy.deepcopy(report)
    pgd = [row for row in out["results"] if row["attack"] == "pgd"]
    out["results"] += [dict(row, attack=name) for name in [*extra, "worst"] for row in pgd]
    return out


def test_the_worst_case_is_paired_only_over_the_same_attacks(report: dict[str, Any]) -> None:
    """Right under every one of {PGD, EOT} is not right under every one of {PGD, EOT, APGD-CE}."""
    first, same, more = (with_attacks(report, ["eot"]), with_attacks(report, ["eot"]),
                         with_attacks(report, ["eot", "apgd-ce"]))
    assert ("worst", 4) in {(r["attack"], r["samples"]) for r in compare(first, same)}
    rows = compare(first, more)
    assert {r["attack"] for r in rows} == {"clean", "pgd", "eot"}
    assert "No worst-case row: the two evaluations ran different attacks (clean, eot, pgd against apgd-ce, " \
        "clean, eot, pgd)" in to_markdown(first, more, rows)
    assert "No worst-case row" not in to_markdown(first, same, compare(first, same))
