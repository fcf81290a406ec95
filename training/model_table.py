"""The model table of the README, made from the committed evaluation files (never typed by hand).

For each checkpoint it reads ``<checkpoint>/eval/knob/eval.json`` (``siam evaluate``: clean, PGD, EOT,
adaptive at each m, two independent answers, CERTIFY with n = m) and, where present, the APGD
evaluation at the model's sigma on the most test images (then the most m values) among
``<checkpoint>/eval/apgd*/eval.json`` (APGD-CE and APGD-DLR with EOT) and a ``benchmarks.latency`` JSON
file, and prints one markdown row per model: accuracy,
per-image worst case over every attack run, what m = 64 buys over m = 1 (paired), repeatability on
attacked images, certified accuracy, latency.

    python -m training.model_table checkpoints/* --latency benchmarks/results/latency-cpu-2cores-epyc.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from models.checkpoint import read_manifest
from training.compare import WORST, own_rule


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def evaluation(checkpoint: Path, kind: str) -> dict[str, Any] | None:
    """``<checkpoint>/eval/<kind>/eval.json``, refused when it was made from other weights than the
    checkpoint's own: a retrained model must not inherit its predecessor's numbers."""
    found = load(checkpoint / "eval" / kind / "eval.json")
    if found is not None:
        shipped = read_manifest(checkpoint).weights.sha256
        made_from = str(found.get("weights_sha256"))
        if made_from != shipped:
            raise SystemExit(f"{checkpoint}/eval/{kind}/eval.json was made from weights {made_from[:16]}, not from "
                             f"the checkpoint's {shipped[:16]}: run that evaluation again")
        found |= {key: own_rule(found, key) for key in ("results", "gain_over_m1")}  # the rule it serves
    return found


def largest_apgd(checkpoint: Path, sigma: float) -> dict[str, Any] | None:
    """The APGD evaluation at the model's own ``sigma`` on the most test images (``eval/apgd``,
    ``eval/apgd-eot5-500``, ...): the narrowest interval among the strongest attack's runs; of two on as
    many images, the one that ran more m values (the table shows m = 1, 16 and 64)."""
    found = [e for kind in sorted(p.name for p in (checkpoint / "eval").glob("apgd*"))
             if (e := evaluation(checkpoint, kind)) is not None and "apgd-ce" in e["attack"]["attacks"]
             and any(r["sigma"] == sigma for r in e["results"])]
    return max(found, key=lambda e: (e["data"]["images"], len({r["samples"] for r in e["results"]
                                                                if r["sigma"] == sigma})), default=None)


def also(evaluation: dict[str, Any]) -> str:
    """What else an APGD evaluation's worst case counts: some ran the grid's PGD attacks beside APGD, and
    their worst case is then over all of them, not over APGD alone."""
    others = [a for a in evaluation["attack"]["attacks"] if a not in ("clean", "apgd-ce", "apgd-dlr")]
    return f", worst with {'/'.join(others)}" if others else ""


def pick(results: list[dict[str, Any]], attack: str, m: int) -> dict[str, Any] | None:
    return next((r for r in results if r["attack"] == attack and r["samples"] == m), None)


def pct(row: dict[str, Any] | None, key: str = "accuracy") -> str:
    return "-" if row is None else f"{100 * row[key]:.1f}"


def milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 10 else f"{value:.0f}"


def strongest(results: list[dict[str, Any]], m: int) -> dict[str, Any] | None:
    """The per-image worst case if several attacks ran, else the lowest single attack."""
    rows = [r for r in results if r["samples"] == m and r["attack"] != "clean"]
    return pick(results, WORST, m) or (min(rows, key=lambda r: r["accuracy"]) if rows else None)


COLUMNS_M = (1, 16, 64, 256)
"""The m values the table shows (a cell is "-" where an evaluation did not run that m)."""
APGD_M = (1, 16, 64)
"""The m values of the APGD column (APGD runs stop at 64 on the CPU)."""


def row(checkpoint: Path, latency: dict[str, dict[str, float]]) -> list[str] | None:
    knob = evaluation(checkpoint, "knob")
    if knob is None:
        return None
    sigma = knob["smoothing"]["sigma"]  # an evaluation may cover other sigmas too: the table is the model's own
    results, gains = [[r for r in knob.get(key, []) if r["sigma"] == sigma] for key in ("results", "gain_over_m1")]
    samples = sorted({r["samples"] for r in results})
    mid = 16 if 16 in samples else samples[len(samples) // 2]
    gain = {g["samples"]: g for g in gains if g["attack"] == WORST}
    attacked = [r for r in results if r["attack"] not in ("clean", WORST) and "agreement" in r]
    weakest_repeat = {m: min((r["agreement"] for r in attacked if r["samples"] == m), default=None) for m in samples}
    cert = {(c["samples"], c["radius"]): c for c in knob.get("certified", []) if c["sigma"] == sigma}
    apgd = largest_apgd(checkpoint, sigma)
    apgd_results = [r for r in apgd["results"] if r["sigma"] == sigma] if apgd else []
    lat = latency.get(knob["model"], {})

    def paired(m: int) -> str:
        g = gain.get(m)
        if g is None:
            return "-"
        return f"{100 * g['difference']:+.1f} [{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}]"

    def each(cell: Any) -> str:
        return " / ".join(cell(m) if m in samples else "-" for m in COLUMNS_M)

    return [
        f"`{knob['model']}`", f"{sigma:g}", str(knob["data"]["images"]), pct(pick(results, "clean", mid)),
        each(lambda m: pct(strongest(results, m))), " / ".join(paired(m) for m in (64, 256)),
        "-" if apgd is None else " / ".join(pct(strongest(apgd_results, m)) for m in APGD_M)
        + f" ({apgd['data']['images']} img, EOT {apgd['attack']['apgd_eot']}{also(apgd)})",
        each(lambda m: "-" if weakest_repeat[m] is None else f"{100 * weakest_repeat[m]:.0f}"),
        " / ".join(pct(cert.get((m, 0.125))) if m in samples else "-" for m in (64, 256)),
        " / ".join(milliseconds(lat.get(str(m))) for m in COLUMNS_M),
    ]


def table(checkpoints: list[Path], latency_file: Path | None) -> str:
    latency: dict[str, dict[str, float]] = {}
    if latency_file is not None and latency_file.is_file():
        latency = {r["model"]: r["ms"] for r in json.loads(latency_file.read_text())["results"]}
    head = ["model", "sigma", "test images", "clean, m=16", "worst case, m=1 / 16 / 64 / 256",
            "worst case gain over m=1: m=64 / 256 (paired)", "APGD worst, m=1 / 16 / 64",
            "attacked answers agree, m=1 / 16 / 64 / 256", "certified r=0.125, m=64 / 256", "ms, m=1 / 16 / 64 / 256"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for checkpoint in checkpoints:
        cells = row(checkpoint, latency)
        if cells is not None:
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(checkpoints: list[Path], path: Path) -> None:
    """The family side by side against m: per-image worst case, repeatability on attacked images (the
    least repeatable attack), certified accuracy at r = 0.125."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for checkpoint in checkpoints:
        knob = evaluation(checkpoint, "knob")
        if knob is None:
            continue
        sigma = knob["smoothing"]["sigma"]
        results = [r for r in knob["results"] if r["sigma"] == sigma]
        samples = sorted({r["samples"] for r in results})
        label = f"{knob['model']} (σ={sigma:g})"
        worst = [strongest(results, m) for m in samples]
        axes[0].errorbar(samples, [100 * w["accuracy"] for w in worst], marker="o", capsize=3, label=label,
                         yerr=[[100 * (w["accuracy"] - w["ci95"][0]) for w in worst],
                               [100 * (w["ci95"][1] - w["accuracy"]) for w in worst]])
        agree = [min(r["agreement"] for r in results if r["samples"] == m and "agreement" in r
                     and r["attack"] != "clean") for m in samples]
        axes[1].plot(samples, [100 * a for a in agree], marker="o", label=label)
        cert = {c["samples"]: c["accuracy"] for c in knob.get("certified", [])
                if c["sigma"] == sigma and c["radius"] == 0.125}
        axes[2].plot(samples, [100 * cert.get(m, 0.0) for m in samples], marker="o", label=label)
    titles = ("worst case over attacks (%), 95% CI", "two answers to an attacked image agree (%)",
              "certified accuracy at L2 radius 0.125 (%)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("m (noisy copies per prediction)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.model_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--latency", type=Path, default=None, help="a benchmarks.latency JSON file")
    p.add_argument("--plot", type=Path, default=None, help="also draw the family against m into this PNG")
    args = p.parse_args(argv)
    print(table(args.checkpoints, args.latency))
    if args.plot:
        plot(args.checkpoints, args.plot)


if __name__ == "__main__":
    main()
