"""``siam compare``: two evaluations paired image by image, and the pairings it must refuse."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from training import evaluate
from training.compare import NotComparableError, attack_label, compare, main, to_markdown


@pytest.fixture(scope="module")
def evaluation(checkpoint: Path, tiny_cifar_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real ``siam evaluate`` of the tiny model, run once for the module."""
    folder = tmp_path_factory.mktemp("compare")
    out = folder / "eval"
    evaluate.main([str(checkpoint), "--data", str(tiny_cifar_tar), "--cache-dir", str(folder / "c"),
                   "--images", "12", "--samples", "1,4", "--attacks", "clean,pgd", "--steps", "1",
                   "--output", str(out), "--threads", "1"])
    return json.loads((out / "eval.json").read_text())


@pytest.fixture
def report(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The module's evaluation, a copy each test may change."""
    return copy.deepcopy(evaluation)


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
    (lambda r: r["data"].update(subset_seed=1),
     r"not the same test images: data subset_seed is \d+ for tiny and 1 for tiny"),
    (lambda r: r["data"].update(sha256="0" * 64), "data sha256 is '[0-9a-f]{64}' for tiny and '0{64}' for tiny"),
    (lambda r: r["attack"].update(steps=7), "not the same attacks: steps 1 against 7"),
    (lambda r: r["attack"].update(steps=7, step=0.5),
     r"not the same attacks: step \S+ against 0.5, steps 1 against 7$"),
    (lambda r: [row.pop("per_image") for row in r["results"]],
     r"no per-image results \(it predates them\): run its `siam evaluate` command again"),
    (lambda r: [row.update(attack={"clean": "eot", "pgd": "adaptive"}[row["attack"]]) for row in r["results"]],
     "no attack and m in common"),
    (lambda r: r["results"].extend(dict(row, sigma=0.5) for row in list(r["results"])),
     r"several sigmas: compare evaluations made at one sigma \(the checkpoint's own, without --sigmas\)"),
    (lambda r: r["results"].extend(dict(row, aggregation="vote") for row in list(r["results"])),
     "several aggregation rules"),
])
def test_it_refuses_what_cannot_be_paired(report: dict[str, Any], change: Any, message: str) -> None:
    other = copy.deepcopy(report)
    change(other)
    with pytest.raises(NotComparableError, match=message):
        compare(report, other)


def test_the_side_without_per_image_results_is_named(report: dict[str, Any]) -> None:
    old = copy.deepcopy(report)
    old["model"] = "old"
    for row in old["results"]:
        row.pop("per_image")
    for pair in ((old, report), (report, old)):
        with pytest.raises(NotComparableError, match=r"^old's evaluation has no per-image results"):
            compare(*pair)


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
    main([str(first.parent), str(second), "--output", str(tmp_path / "new" / "folder" / "out.md")])
    printed = capsys.readouterr().out
    assert "### other against tiny: paired on the same 12 test images" in printed
    assert "| clean | 1 |" in printed and (tmp_path / "new" / "folder" / "out.md").read_text() == printed
    main([str(first.parent), str(first.parent), "--output", str(tmp_path / "new" / "folder" / "out.md")])
    assert "### tiny against tiny" in (tmp_path / "new" / "folder" / "out.md").read_text()  # into a folder that exists
    second.write_text(json.dumps({**report, "data": {**report["data"], "subset_seed": 1}}))
    with pytest.raises(SystemExit, match="siam compare: not the same test images: data subset_seed"):
        main([str(first), str(second)])


def longer(report: dict[str, Any], extra: str, images: int | None = None) -> dict[str, Any]:
    """The same evaluation on more test images: the same first answers (the first images of one permutation),
    then ``extra``'s answers for every result."""
    out = copy.deepcopy(report)
    out["model"] = "longer"
    out["data"]["images"] = images or report["data"]["images"] + len(extra)
    for row in out["results"]:
        row["per_image"] += extra
        row["correct"] = row["per_image"].count("1")
        row["accuracy"] = row["correct"] / len(row["per_image"])
    return out


def test_a_smaller_run_pairs_with_the_first_images_of_a_larger_one(report: dict[str, Any],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    larger = longer(report, "0" * 8)  # 20 images, the last 8 all wrong: they must not count
    rows = compare(report, larger)
    assert all(r["images"] == 12 and r["difference"] == 0 and r["first"] == r["second"] for r in rows)
    assert {r["second"] for r in rows} == {r["accuracy"] for r in report["results"]}
    assert "paired on the first 12 (of 20) test images" in to_markdown(report, larger, rows)
    whole = longer(report, "0" * 8, images=10_000)  # the whole split is in file order: not a prefix of anything
    with pytest.raises(NotComparableError, match="12 against 10000, and a run of the whole test split"):
        compare(report, whole)


def test_attack_settings_pairs_one_models_two_evaluations_and_only_those(report: dict[str, Any]) -> None:
    right = [i for i, c in enumerate(rows_of(report, "pgd", 4)) if c == "1"][:2]
    assert right  # the tiny model answers some attacked image right: a stronger attack takes them
    stronger = flipped(report, "pgd", 4, right)
    stronger["model"] = report["model"]
    stronger["attack"].update(steps=7)
    with pytest.raises(NotComparableError, match="not the same attacks: steps 1 against 7"):
        compare(report, stronger)
    rows = {(r["attack"], r["samples"]): r for r in compare(report, stronger, attack_settings=True)}
    assert rows["pgd", 4]["lost"] == len(right) and rows["pgd", 4]["gained"] == 0
    assert rows["clean", 1]["difference"] == 0
    text = to_markdown(report, stronger, list(rows.values()), attack_settings=True)
    assert "### tiny, PGD-7, EOT 8, 8 adaptive copies against tiny, PGD-1, EOT 8, 8 adaptive copies" in text
    apgd = with_attacks(report, ["apgd-ce"]), with_attacks(report, ["apgd-ce"])
    apgd[1]["attack"].update(apgd_eot=20, apgd_steps=100)
    text = to_markdown(*apgd, compare(*apgd, attack_settings=True), attack_settings=True)
    eot = report["attack"]["apgd_eot"]
    assert f"### tiny, APGD 100 steps, EOT 20; PGD-1, EOT 8, 8 adaptive copies against tiny, APGD " \
           f"{report['attack']['apgd_steps']} steps, EOT {eot}; PGD-1" in text
    clean_only = copy.deepcopy(report)
    clean_only["results"] = [r for r in report["results"] if r["attack"] == "clean"]
    assert "### tiny, clean only against tiny, clean only" in to_markdown(
        clean_only, clean_only, compare(clean_only, clean_only, attack_settings=True), attack_settings=True)
    other_weights = copy.deepcopy(stronger)
    other_weights["weights_sha256"] = "0" * 64
    with pytest.raises(NotComparableError, match="--attack-settings pairs two evaluations of one model"):
        compare(report, other_weights, attack_settings=True)


def rows_of(report: dict[str, Any], attack: str, m: int) -> str:
    return next(r["per_image"] for r in report["results"] if (r["attack"], r["samples"]) == (attack, m))


def test_settings_of_an_attack_neither_ran_do_not_block_the_pairing(report: dict[str, Any]) -> None:
    """Every eval.json records APGD's and EOT's settings; they matter only where those attacks ran."""
    other = copy.deepcopy(report)
    other["model"] = "other"
    other["attack"].update(apgd_eot=5, apgd_steps=50, eot_draws=3, adaptive_samples=4)
    assert {(r["attack"], r["samples"]) for r in compare(report, other)} == {
        (a, m) for a in ("clean", "pgd") for m in (1, 4)}


def test_settings_of_an_attack_one_side_ran_do_not_block_the_attacks_both_ran(report: dict[str, Any]) -> None:
    """A model evaluated with APGD (at its own settings) still pairs with one evaluated without it, on the
    attacks both ran; an attack the pairing does not know is held to every setting."""
    other = with_attacks(report, ["apgd-ce"])
    other["attack"].update(apgd_eot=5, apgd_steps=50)
    assert {r["attack"] for r in compare(report, other)} == {"clean", "pgd"}
    unknown = with_attacks(report, ["nattack"]), with_attacks(report, ["nattack"])
    assert {r["attack"] for r in compare(*unknown)} == {"clean", "pgd", "nattack", "worst"}
    unknown[1]["attack"].update(apgd_eot=5)
    with pytest.raises(NotComparableError, match=r"not the same attacks: apgd_eot \d+ against 5$"):
        compare(*unknown)


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


def test_what_is_not_an_evaluation_is_refused_in_one_line(tmp_path: Path) -> None:
    """A wrong path, a file that is not JSON, or JSON that is not an evaluation: the user's mistake, named,
    and no traceback."""
    good = tmp_path / "good.json"
    good.write_text(json.dumps(dict.fromkeys(("model", "command", "data", "attack", "smoothing", "results"), "x")))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "other.json").write_text(json.dumps({"model": "m", "results": []}))
    (tmp_path / "empty").mkdir()
    for path, message in [
        (tmp_path / "missing", "no eval.json at .*missing: give a file or folder written by `siam evaluate --output`"),
        (tmp_path / "empty", "no eval.json at .*empty"),
        (tmp_path / "broken.json", ".*broken.json is not an evaluation \\(not JSON: "),
        (tmp_path / "other.json", ".*other.json is not an evaluation written by `siam evaluate`: it has no command, "
                                  "data, attack, smoothing$"),
    ]:
        for argv in ([str(path), str(good)], [str(good), str(path)]):
            with pytest.raises(SystemExit, match="^siam compare: " + message):
                main(argv)


def test_rules_must_name_two_and_the_help_says_what_each_argument_is(capsys: pytest.CaptureFixture[str],
                                                                     tmp_path: Path, report: dict[str, Any]) -> None:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(report))
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), str(path), "--rules", "softmax"])
    assert exit_info.value.code == 2
    assert "siam compare: error: --rules takes two rules, the first side's and the second's: got 'softmax'" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for part in ("usage: siam compare [-h] [--rules FIRST,SECOND] [--attack-settings] [--output OUTPUT] first second",
                 "Is one model more robust than another on the same images?",
                 "the baseline's eval.json (or the folder holding it)",
                 "the other model's eval.json (or folder), on the same images",
                 "the aggregation rule of each side", "also write the table here (Markdown)"):
        assert part in text


def synthetic(model: str, results: dict[tuple[str, int], str], rule: str = "softmax") -> dict[str, Any]:
    """An evaluation written by hand: per-image answers for each (attack, m), nothing else run."""
    images = len(next(iter(results.values())))
    return {"model": model, "command": f"siam evaluate {model}", "smoothing": {"aggregation": rule, "sigma": 0.25},
            "data": {"sha256": "a" * 64, "images": images, "subset_seed": 0},
            "attack": {"norm": "Linf", "eps": 8 / 255, "step": 2 / 255, "steps": 7, "restarts": 1},
            "results": [{"attack": a, "samples": m, "sigma": 0.25, "aggregation": rule, "per_image": bits,
                         "correct": bits.count("1"), "accuracy": bits.count("1") / images}
                        for (a, m), bits in results.items()]}


def test_the_table_is_exactly_the_paired_difference_worked_by_hand() -> None:
    """3 gained and 2 lost of 10: +10.0 points, se = sqrt(3 + 2 - 1 / 10) / 10, 95%: +-1.959964 se."""
    first = synthetic("a", {("clean", 1): "1110011000"})
    second = synthetic("b", {("clean", 1): "0011111100"})
    assert to_markdown(first, second, compare(first, second)) == (
        "### b against a: paired on the same 10 test images\n\n"
        "| attack | m | a | b | difference, 95% interval | images gained / lost |\n"
        "|---|---|---|---|---|---|\n"
        "| clean | 1 | 50.0 | 60.0 | +10.0 [-33.4, +53.4] | 3 / 2 |\n\n"
        "Evaluations: `siam evaluate a` and `siam evaluate b`.\n")


def test_the_table_says_why_it_has_no_worst_case_row() -> None:
    first = synthetic("a", {("clean", 4): "1100", ("pgd", 4): "1000", ("worst", 4): "1000"})
    second = synthetic("b", {("clean", 4): "1100", ("pgd", 4): "1000", ("eot", 4): "0000", ("worst", 4): "0000"})
    assert to_markdown(first, second, compare(first, second)) == (
        "### b against a: paired on the same 4 test images\n\n"
        "| attack | m | a | b | difference, 95% interval | images gained / lost |\n"
        "|---|---|---|---|---|---|\n"
        "| clean | 4 | 50.0 | 50.0 | +0.0 [+0.0, +0.0] | 0 / 0 |\n"
        "| pgd | 4 | 25.0 | 25.0 | +0.0 [+0.0, +0.0] | 0 / 0 |\n\n"
        "No worst-case row: the two evaluations ran different attacks (clean, pgd against clean, eot, pgd).\n\n"
        "Evaluations: `siam evaluate a` and `siam evaluate b`.\n")


def test_one_rules_results_are_picked_out_of_an_evaluation_of_several() -> None:
    """The model table shows the rule a checkpoint serves; ``--rules`` pairs any one. Results written before
    ``--aggregations`` carry no rule and are the checkpoint's own."""
    from training.compare import own_rule, under_rule

    report = synthetic("a", {("clean", 1): "10", ("pgd", 1): "00"})
    report["results"] += synthetic("a", {("clean", 1): "11"}, rule="vote")["results"]
    old = dict(report["results"][1])
    del old["aggregation"]
    report["results"].append(old)
    report["gain_over_m1"] = [{"attack": "worst", "samples": 4, "aggregation": rule} for rule in ("softmax", "vote")]
    assert [(r["attack"], r["per_image"]) for r in own_rule(report)] == [("clean", "10"), ("pgd", "00"), ("pgd", "00")]
    assert [r["aggregation"] for r in own_rule(report, "gain_over_m1")] == ["softmax"]
    vote = under_rule(report, "vote")
    assert vote["model"] == "a (vote)" and [r["per_image"] for r in vote["results"]] == ["11"]
    assert [r["aggregation"] for r in vote["gain_over_m1"]] == ["vote"]
    assert report["smoothing"]["aggregation"] == "softmax" and len(report["results"]) == 4  # the input is untouched
    plain = synthetic("p", {("clean", 1): "1"})  # written without gains over m = 1
    assert own_rule(plain, "gain_over_m1") == [] and under_rule(plain, "softmax")["gain_over_m1"] == []
    with pytest.raises(NotComparableError, match=r"^a's evaluation has no results under the logits rule "
                                                 r"\(it answered with softmax, vote\)$"):
        under_rule(report, "logits")


@pytest.mark.parametrize("attack", ["apgd-ce", "apgd-dlr", "pgd", "eot", "adaptive", "adaptive-logits"])
def test_the_attack_label_names_the_settings_of_any_attack_that_ran(report: dict[str, Any], attack: str) -> None:
    alone = copy.deepcopy(report)
    alone["results"] = [dict(row, attack=attack) for row in report["results"] if row["attack"] == "pgd"]
    label = attack_label(alone)
    assert label.startswith("APGD ") if attack.startswith("apgd") else label.startswith("PGD-1, EOT 8"), label
