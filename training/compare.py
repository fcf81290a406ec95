"""Is one model more robust than another on the same images? (``siam compare``)

Two ``siam evaluate`` runs on the same test images (same data checksum and subset seed; with two image
counts, the first images of the larger run are the smaller one's, and the pairing is on those) and the
same attack settings can be paired image by image: only the images on which the two models
disagree carry information, so the paired interval is far narrower than two independent ones: two
models' 95% intervals can overlap while their paired difference excludes zero. Prints, for every attack and m that
both evaluations ran, the second model's accuracy minus the first's with its 95% interval and the
images gained and lost. With ``--rules``, two aggregation rules (``siam evaluate --aggregations``, one
evaluation or two) pair the same way. With ``--attack-settings``, two evaluations of one model (the same
weights) under different attack settings pair too: the difference is then what the second's attacks find
that the first's did not (e.g. APGD with EOT 20 against EOT 5).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from training.measure import paired_difference

SPLIT_IMAGES = 10_000
"""CIFAR's test split. ``siam evaluate --images N`` takes the first N of a fixed random permutation, so the first
images of a larger run are a smaller run's; a run of the whole split is in file order instead, so it pairs
only with another of the whole split."""

WORST = "worst"
"""The per-image worst case ``siam evaluate`` adds: right under every attack it ran."""

# Attack settings that must match for two evaluations to be comparable, by the attack that uses them: only
# those of the attacks both evaluations ran are checked (an evaluation records APGD's settings even where
# APGD did not run). An attack not listed here is held to all of them.
ATTACK_KEYS = ("norm", "eps", "step", "steps", "restarts", "eot_draws", "adaptive_samples", "apgd_steps", "apgd_eot")
_PGD = ("norm", "eps", "step", "steps", "restarts")
_APGD = ("norm", "eps", "apgd_steps", "apgd_eot")
ATTACK_SETTINGS: dict[str, tuple[str, ...]] = {
    "clean": (), "pgd": _PGD, "eot": (*_PGD, "eot_draws"), "adaptive": (*_PGD, "adaptive_samples"),
    "adaptive-logits": (*_PGD, "adaptive_samples"), "apgd-ce": _APGD, "apgd-dlr": _APGD}


EVALUATION_KEYS = ("model", "command", "data", "attack", "smoothing", "results")
"""What every ``eval.json`` holds and the pairing reads."""


class NotComparableError(ValueError):
    """The two evaluations were not made on the same images or with the same attacks."""


def load_evaluation(path: Path) -> dict[str, Any]:
    """An ``eval.json``, given itself or the folder that holds it."""
    file = path / "eval.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no eval.json at {path}: give a file or folder written by `siam evaluate --output`")
    try:
        report = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not an evaluation (not JSON: {e})") from None
    missing = [key for key in EVALUATION_KEYS if not isinstance(report, dict) or key not in report]
    if missing:
        raise ValueError(f"{file} is not an evaluation written by `siam evaluate`: it has no {', '.join(missing)}")
    return report


def per_image_bits(correct: torch.Tensor) -> str:
    """One character per test image, '1' where the answer was right: what ``siam evaluate`` keeps in
    each result of ``eval.json`` so that two models can be paired image by image."""
    return "".join("1" if c else "0" for c in correct.tolist())


def _bits(row: dict[str, Any], model: str) -> torch.Tensor:
    """The per-image answers of one result, as :func:`per_image_bits` wrote them."""
    if "per_image" not in row:
        raise NotComparableError(f"{model}'s evaluation has no per-image results (it predates them): "
                                 "run its `siam evaluate` command again")
    return torch.tensor([c == "1" for c in row["per_image"]], dtype=torch.bool)


def rule_of(row: dict[str, Any], report: dict[str, Any]) -> str:
    """A result's aggregation rule (results written before ``--aggregations`` used the checkpoint's)."""
    return row.get("aggregation", report["smoothing"]["aggregation"])


def own_rule(report: dict[str, Any], key: str = "results") -> list[dict[str, Any]]:
    """The results (or ``gain_over_m1``) under the checkpoint's own aggregation rule: what it serves."""
    return [r for r in report.get(key, []) if rule_of(r, report) == report["smoothing"]["aggregation"]]


def under_rule(report: dict[str, Any], rule: str) -> dict[str, Any]:
    """The evaluation's results under one aggregation rule, named ``<model> (<rule>)``: so two rules of one
    ``siam evaluate --aggregations`` run pair image by image like two models."""
    kept = {key: [r for r in report.get(key, []) if rule_of(r, report) == rule] for key in ("results", "gain_over_m1")}
    if not kept["results"]:
        ran = sorted({rule_of(r, report) for r in report["results"]})
        raise NotComparableError(f"{report['model']}'s evaluation has no results under the {rule} rule "
                                 f"(it answered with {', '.join(ran)})")
    return {**report, **kept, "model": f"{report['model']} ({rule})"}


def _by_key(report: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    if len({row.get("aggregation") for row in report["results"]}) > 1:
        raise NotComparableError(f"{report['model']}'s evaluation answered with several aggregation rules: pick "
                                 "one for each side with --rules")
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for row in report["results"]:
        key = (row["attack"], int(row["samples"]))
        if key in rows:
            raise NotComparableError(f"{report['model']}'s evaluation has several sigmas: compare evaluations made "
                                     "at one sigma (the checkpoint's own, without --sigmas)")
        rows[key] = row
    return rows


def attacks_run(report: dict[str, Any]) -> set[str]:
    """The attacks an evaluation ran (``clean`` included), not counting its per-image worst case."""
    return {row["attack"] for row in report["results"]} - {WORST}


def worst_is_paired(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """The worst case means the same only over the same attacks: wrong under any of {PGD, EOT} is not wrong
    under any of {PGD, EOT, APGD}."""
    return attacks_run(first) == attacks_run(second)


def same_model(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """Both evaluations are of one checkpoint's weights, answered the same way: only the attacks can differ."""
    sha = first.get("weights_sha256")
    return sha is not None and sha == second.get("weights_sha256") and first["smoothing"] == second["smoothing"]


def check_comparable(first: dict[str, Any], second: dict[str, Any], attack_settings: bool = False) -> int:
    """Refuse a pairing that would compare different images or different attacks (with ``attack_settings``:
    a model other than the first's). Returns the number of test images paired: the smaller run's."""
    for key in ("sha256", "subset_seed"):
        if first["data"].get(key) != second["data"].get(key):
            raise NotComparableError(f"not the same test images: data {key} is {first['data'].get(key)!r} for "
                                     f"{first['model']} and {second['data'].get(key)!r} for {second['model']}")
    counts = (first["data"]["images"], second["data"]["images"])
    if counts[0] != counts[1] and max(counts) >= SPLIT_IMAGES:
        raise NotComparableError(f"not the same test images: {counts[0]} against {counts[1]}, and a run of the "
                                 "whole test split is in file order, not the permutation a smaller run takes from")
    if attack_settings:
        if not same_model(first, second):
            raise NotComparableError("--attack-settings pairs two evaluations of one model: these are of "
                                     f"{first['model']} and {second['model']} (other weights or smoothing)")
        return min(counts)
    common = attacks_run(first) & attacks_run(second)
    settings = {k for attack in common for k in ATTACK_SETTINGS.get(attack, ATTACK_KEYS)}
    differ = [k for k in ATTACK_KEYS if k in settings and first["attack"].get(k) != second["attack"].get(k)]
    if differ:
        raise NotComparableError("not the same attacks: " + ", ".join(
            f"{k} {first['attack'].get(k)} against {second['attack'].get(k)}" for k in differ))
    return min(counts)


def compare(first: dict[str, Any], second: dict[str, Any], attack_settings: bool = False) -> list[dict[str, Any]]:
    """Paired accuracy differences, second minus first, for every (attack, m) both evaluations hold, on the
    test images both ran (the first ones of the larger run)."""
    n = check_comparable(first, second, attack_settings)
    a, b = _by_key(first), _by_key(second)
    common = [key for key in a if key in b and (key[0] != WORST or worst_is_paired(first, second))]
    if not common:
        raise NotComparableError(f"no attack and m in common: {sorted(a)} against {sorted(b)}")
    rows = []
    for attack, m in common:
        ours, theirs = _bits(a[attack, m], first["model"])[:n], _bits(b[attack, m], second["model"])[:n]
        rows.append({"attack": attack, "samples": m, "first": int(ours.sum()) / n, "second": int(theirs.sum()) / n,
                     **paired_difference(theirs, ours)})  # its "images": the n paired
    return rows


def to_markdown(first: dict[str, Any], second: dict[str, Any], rows: list[dict[str, Any]],
                attack_settings: bool = False) -> str:
    a, b = first["model"], second["model"]
    n = rows[0]["images"] if rows else first["data"]["images"]
    if attack_settings:
        a, b = f"{a}, {attack_label(first)}", f"{b}, {attack_label(second)}"
    counts = {first["data"]["images"], second["data"]["images"]}
    which = f"the same {n}" if len(counts) == 1 else f"the first {n} (of {max(counts)})"
    lines = [f"### {b} against {a}: paired on {which} test images", "",
             f"| attack | m | {a} | {b} | difference, 95% interval | images gained / lost |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        low, high = r["ci95"]
        lines.append(f"| {r['attack']} | {r['samples']} | {100 * r['first']:.1f} | {100 * r['second']:.1f} | "
                     f"{100 * r['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] | "
                     f"{r['gained']} / {r['lost']} |")
    both_have_worst = all(any(r["attack"] == WORST for r in report["results"]) for report in (first, second))
    if both_have_worst and not worst_is_paired(first, second):
        lines += ["", f"No worst-case row: the two evaluations ran different attacks "
                      f"({', '.join(sorted(attacks_run(first)))} against {', '.join(sorted(attacks_run(second)))})."]
    lines += ["", f"Evaluations: `{first['command']}` and `{second['command']}`."]
    return "\n".join(lines) + "\n"


def attack_label(report: dict[str, Any]) -> str:
    """What sets one evaluation's attacks apart, for the same model evaluated twice."""
    a = report["attack"]
    ran = attacks_run(report)
    parts = [f"APGD {a.get('apgd_steps')} steps, EOT {a.get('apgd_eot')}"] if ran & {"apgd-ce", "apgd-dlr"} else []
    if ran & {"pgd", "eot", "adaptive", "adaptive-logits"}:
        parts.append(f"PGD-{a.get('steps')}, EOT {a.get('eot_draws')}, {a.get('adaptive_samples')} adaptive copies")
    return "; ".join(parts) or "clean only"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="siam compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", type=Path, help="the baseline's eval.json (or the folder holding it)")
    p.add_argument("second", type=Path, help="the other model's eval.json (or folder), on the same images")
    p.add_argument("--rules", default=None, metavar="FIRST,SECOND",
                   help="the aggregation rule of each side, for evaluations made with `siam evaluate --aggregations` "
                        "(both sides may be the same evaluation: `--rules softmax,vote`)")
    p.add_argument("--attack-settings", action="store_true",
                   help="the two are evaluations of one model under different attack settings: pair them anyway, "
                        "to see what the second's attacks find that the first's did not")
    p.add_argument("--output", type=Path, default=None, help="also write the table here (Markdown)")
    args = p.parse_args(argv)
    try:
        first, second = load_evaluation(args.first), load_evaluation(args.second)
    except (OSError, ValueError) as e:  # no such file, not JSON, or not an evaluation: say which, no traceback
        raise SystemExit(f"siam compare: {e}") from None
    try:
        if args.rules is not None:
            rules = [r.strip() for r in args.rules.split(",")]
            if len(rules) != 2:
                p.error(f"--rules takes two rules, the first side's and the second's: got {args.rules!r}")
            first, second = under_rule(first, rules[0]), under_rule(second, rules[1])
        rows = compare(first, second, args.attack_settings)
    except NotComparableError as e:
        raise SystemExit(f"siam compare: {e}") from None
    text = to_markdown(first, second, rows, args.attack_settings)
    print(text, end="")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
