"""What a smoothed checkpoint's knob buys, clean and under attack, against m (``siam evaluate``).

For each sigma the adversarial examples are crafted once per attack, then the smoothed classifier
answers them at each m (the aggregation rule stored in the checkpoint, or each of ``--aggregations``,
all reading the same noisy copies), twice, from two independent draws of noise. Attacks (all L-inf,
eps 8/255 by default):

* ``pgd``: the paper's PGD-k, gradient from one noise draw per step;
* ``eot``: PGD-k with the gradient averaged over ``--eot`` noise draws (EOT);
* ``adaptive``: PGD-k on the smoothed soft output itself, log of the mean softmax over
  ``--adaptive-samples`` copies (Salman et al., 2019);
* ``adaptive-logits``: the same on the mean of the logits over those copies, the smoothed output of the
  ``logits`` aggregation rule (not in the default list: ``adaptive`` attacks the checkpoint's rule unless
  that is ``logits``);
* ``apgd-ce``, ``apgd-dlr``: AutoAttack's protocol for randomized defenses, APGD with the cross-entropy
  and the DLR loss, ``--apgd-steps`` steps, gradients averaged over ``--apgd-eot`` draws (torchattacks'
  implementation; slow on a CPU, so not in the default list).

What m buys, in three currencies, each with 95% intervals:

* **robust accuracy**, per attack and per image worst case over every attack run (``worst``), with the
  paired gain of each m over m = 1 on the same adversarial images;
* **certified accuracy** (clean images) at L2 radii ``--radii``: Cohen's CERTIFY with n0 = n = m, the class
  from one set of m copies, its probability bounded on the other (alpha ``--alpha``);
* **repeatability**: the share of images on which the two independent answers agree, clean and attacked.

Each result keeps its per-image correctness (``per_image``), so ``siam compare`` can pair two models
evaluated on the same test images.

Writes ``eval.json``, ``eval.md`` and ``eval.png`` (the three against m, with latency) into ``--output``.

``siam evaluate --report [--quick]`` writes the full robustness report instead (sigma and m chosen on
validation images, stronger and black-box attacks, an eps sweep, CERTIFY); see
``siam evaluate --report --help``. ``siam evaluate --sequential`` measures sequential sampling (copies
used clean and attacked, agreement with the fixed budget); see ``siam evaluate --sequential --help``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.checkpoint import load_checkpoint
from models.cli_types import non_negative_float, positive_int, positive_int_list, probability, unwritable
from models.smooth import Smooth
from training.attacks import apgd, pgd, smoothed_log_probs, smoothed_mean_logits
from training.compare import WORST, per_image_bits, rule_of
from training.data import add_data_arguments, load_split, to_float
from training.measure import clopper_pearson, latency_ms, paired_difference
from training.robustness import accuracy_entry, answers_by_rule, certified_accuracy, certify_by_m
from training.train import resolve_device

ATTACKS = ("clean", "pgd", "eot", "adaptive", "adaptive-logits", "apgd-ce", "apgd-dlr")
RULES = ("vote", "softmax", "logits")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="siam evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint folder (manifest.json + weights.safetensors)")
    add_data_arguments(p)
    p.add_argument("--images", type=positive_int, default=1000,
                   help="test images (a fixed random subset; default %(default)s)")
    p.add_argument("--samples", type=positive_int_list, default="1,4,16,64",
                   help="comma-separated m values (default: %(default)s)")
    p.add_argument("--sigmas", default=None, help="comma-separated sigmas (default: the checkpoint's)")
    p.add_argument("--aggregations", default=None,
                   help="comma-separated aggregation rules to answer with, of vote,softmax,logits, each reading the "
                        "same noisy copies of the same adversarial images (default: the checkpoint's)")
    p.add_argument("--attacks", default="clean,pgd,eot,adaptive",
                   help=f"subset of {','.join(ATTACKS)} (default: %(default)s)")
    p.add_argument("--eps", type=non_negative_float, default=8 / 255)
    p.add_argument("--step", type=non_negative_float, default=2 / 255)
    p.add_argument("--steps", type=positive_int, default=7)
    p.add_argument("--restarts", type=positive_int, default=1)
    p.add_argument("--eot", type=positive_int, default=8, help="noise draws per gradient for the eot attack")
    p.add_argument("--adaptive-samples", type=positive_int, default=8,
                   help="copies in the adaptive attack's soft output")
    p.add_argument("--apgd-steps", type=positive_int, default=100, help="APGD iterations (default: %(default)s)")
    p.add_argument("--apgd-eot", type=positive_int, default=20,
                   help="noise draws per APGD gradient (default: %(default)s)")
    p.add_argument("--radii", default="0,0.0625,0.125,0.25,0.5",
                   help="L2 radii for certified accuracy, in the space sigma is measured in (default: %(default)s)")
    p.add_argument("--alpha", type=probability, default=0.001,
                   help="CERTIFY's failure probability (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=100, help="images per attack batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seeds the subset choice, the attacks' and the noise draws")
    p.add_argument("--output", default=None, help="output folder (default: <checkpoint>/eval)")
    p.add_argument("--quick", action="store_true", help="100 images, m in 1,4, PGD and EOT only")
    p.add_argument("--sequential", action="store_true",
                   help="measure sequential sampling instead; `siam evaluate --sequential --help` lists its options")
    p.add_argument("--report", action="store_true",
                   help="write the robustness report (reports/robustness/) instead; "
                        "`siam evaluate --report --help` lists its options")
    return p


def craft(attack: str, smooth: Smooth, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """Adversarial versions of ``x`` for one attack (``clean`` returns ``x``)."""
    kw = {"eps": args.eps, "step": args.step, "steps": args.steps, "restarts": args.restarts}
    if attack == "clean":
        return x
    if attack == "pgd":
        return pgd(smooth.forward_noisy, x, y, **kw)
    if attack == "eot":
        return pgd(smooth.forward_noisy, x, y, eot=args.eot, **kw)
    if attack == "adaptive":
        return pgd(smoothed_log_probs(smooth, args.adaptive_samples), x, y, **kw)
    if attack == "adaptive-logits":
        return pgd(smoothed_mean_logits(smooth, args.adaptive_samples), x, y, **kw)
    if attack in ("apgd-ce", "apgd-dlr"):
        return apgd(smooth.forward_noisy, smooth.model, x, y, loss=attack.removeprefix("apgd-"), eps=args.eps,
                    steps=args.apgd_steps, eot=args.apgd_eot)
    raise ValueError(f"unknown attack {attack!r}")


def _parse_list(text: str, kind: type) -> list[Any]:
    return [kind(v) for v in text.split(",") if v.strip()]


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.images, args.samples, args.attacks = min(args.images, 100), [1, 4], "clean,pgd,eot"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, 0)
    model, manifest = load_checkpoint(args.checkpoint, device)
    spec = manifest.spec
    samples = sorted(set(args.samples))
    sigmas = _parse_list(args.sigmas, float) if args.sigmas else [spec.smoothing.sigma]
    radii = _parse_list(args.radii, float)
    attacks = [a.strip() for a in args.attacks.split(",")]
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise SystemExit(f"unknown attacks {sorted(unknown)}; choose from {', '.join(ATTACKS)}")
    rules = list(dict.fromkeys(_parse_list(args.aggregations, str.strip))) if args.aggregations else [
        spec.smoothing.aggregation]
    if not rules or set(rules) - set(RULES):
        raise SystemExit(f"--aggregations takes rules from {', '.join(RULES)}; got {args.aggregations!r}")
    test = load_split(args.data, "test", args.cache_dir).subset(args.images, seed=args.seed)
    torch.manual_seed(args.seed)

    rows: list[dict[str, Any]] = []
    certified: list[dict[str, Any]] = []
    gains: list[dict[str, Any]] = []
    bar = tqdm(total=len(sigmas) * len(attacks) * len(test), desc="evaluate", unit="img", dynamic_ncols=True)
    for sigma in sigmas:
        smooth = Smooth(model, spec.smoothing.model_copy(update={"sigma": sigma}), spec.architecture.num_classes)
        correct: dict[tuple[str, str], dict[int, list[torch.Tensor]]] = {
            (rule, a): {m: [] for m in samples} for rule in rules for a in attacks}
        agree: dict[tuple[str, str], dict[int, list[torch.Tensor]]] = {
            (rule, a): {m: [] for m in samples} for rule in rules for a in attacks}
        certificates: dict[int, list[Any]] = {m: [] for m in samples}
        for i in range(0, len(test), args.batch_size):
            x = to_float(test.images[i:i + args.batch_size].to(device))
            y = test.labels[i:i + args.batch_size]
            for attack in attacks:
                bar.set_postfix(sigma=sigma, attack=attack)
                adv = craft(attack, smooth, x, y.to(device), args)
                first, second = (answers_by_rule(smooth, adv, samples, rules),
                                 answers_by_rule(smooth, adv, samples, rules))
                for rule in rules:
                    for m in samples:
                        correct[rule, attack][m].append(first[rule].labels[m] == y)
                        agree[rule, attack][m].append(first[rule].labels[m] == second[rule].labels[m])
                if attack == "clean":  # from the vote counts, which every rule shares
                    for m, certs in certify_by_m(first[rules[0]], second[rules[0]], sigma, args.alpha).items():
                        certificates[m].extend(certs)
                bar.update(len(y))
        for rule in rules:
            by_m = {a: {m: torch.cat(v) for m, v in correct[rule, a].items()} for a in attacks}
            attacked = [a for a in attacks if a != "clean"]
            if len(attacked) > 1:  # the per-image worst case: right under every attack that was run
                by_m[WORST] = {m: torch.stack([by_m[a][m] for a in attacked]).all(0) for m in samples}
            for attack, per_m in by_m.items():
                for m in samples:
                    repeat = torch.cat(agree[rule, attack][m]) if (rule, attack) in agree else None
                    rows.append({"sigma": sigma, "aggregation": rule, "attack": attack, "samples": m,
                                 **accuracy_entry(per_m[m]),
                                 **({"agreement": float(repeat.float().mean()),
                                     "agreement_ci95": list(clopper_pearson(int(repeat.sum()), int(repeat.numel())))}
                                    if repeat is not None else {}),
                                 "per_image": per_image_bits(per_m[m])})
                gains += [{"sigma": sigma, "aggregation": rule, "attack": attack, "samples": m,
                           **paired_difference(per_m[m], per_m[samples[0]])} for m in samples[1:]]
        if certificates[samples[0]]:
            labels = test.labels.tolist()
            certified += [{"sigma": sigma, "samples": m, **entry}
                          for m in samples for entry in certified_accuracy(certificates[m], labels, radii)]
    bar.close()
    probe = to_float(test.images[:1].to(device))
    base = Smooth(model, spec.smoothing, spec.architecture.num_classes)
    latency = {m: latency_ms(base, probe, m) for m in samples}
    return {
        "command": "siam evaluate " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["evaluate"] else sys.argv[1:]),
        "checkpoint": str(args.checkpoint), "model": manifest.name, "weights_sha256": manifest.weights.sha256,
        "smoothing": spec.smoothing.model_dump(), "aggregations": rules, "noise_layers": spec.noise_layers.model_dump(),
        "data": {"source": test.source, "sha256": test.checksum, "encoding": test.encoding,
                 "images": len(test), "subset_seed": args.seed},
        "attack": {"norm": "Linf", "eps": args.eps, "step": args.step, "steps": args.steps,
                   "restarts": args.restarts, "eot_draws": args.eot, "adaptive_samples": args.adaptive_samples,
                   "apgd_steps": args.apgd_steps, "apgd_eot": args.apgd_eot, "attacks": attacks},
        "certify": {"alpha": args.alpha, "n0": "m", "n": "m", "radii": radii, "space": spec.smoothing.space},
        "machine": {"device": str(device), "platform": platform.platform(), "processor": platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "latency_ms_one_image": latency, "results": rows, "gain_over_m1": gains, "certified": certified,
    }


def _cell(r: dict[str, Any], key: str = "accuracy", ci: str = "ci95") -> str:
    return f"{100 * r[key]:.1f} [{100 * r[ci][0]:.1f}, {100 * r[ci][1]:.1f}]"


def _order(attack: str) -> int:
    return ATTACKS.index(attack) if attack in ATTACKS else len(ATTACKS)


def latency_by_m(report: dict[str, Any]) -> dict[int, float]:
    """Milliseconds of one prediction at each m, keyed by int also in a report read back from JSON."""
    return {int(m): ms for m, ms in report["latency_ms_one_image"].items()}


def to_markdown(report: dict[str, Any]) -> str:
    results = report["results"]
    samples = sorted({r["samples"] for r in results})
    rules = list(dict.fromkeys(rule_of(r, report) for r in results))
    several = len(rules) > 1  # then a column says which rule answered

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["sigma"], rules.index(rule_of(r, report)), _order(r["attack"]), r["attack"]

    def label(k: tuple[Any, ...]) -> str:
        return f"| {k[0]:g} | " + (f"{rules[k[1]]} | " if several else "") + f"{k[3]} | "

    def head(columns: list[int]) -> list[str]:
        return ["| sigma | " + ("rule | " if several else "") + "attack | " + " | ".join(f"m={m}" for m in columns)
                + " |", "|---|---|" + ("---|" if several else "") + "---|" * len(columns)]

    a = report["attack"]

    def table(keep: Any, cell: Any) -> list[str]:
        lines = head(samples)
        for k in sorted({key(r) for r in results if keep(r)}):
            by_m = {r["samples"]: r for r in results if key(r) == k}
            lines.append(label(k) + " | ".join(cell(by_m[m]) for m in samples) + " |")
        return lines

    ran = {r["attack"] for r in results}
    pgd_kinds = "/".join(k for k in ("pgd", "eot", "adaptive", "adaptive-logits") if k in ran)
    described = [f"L-inf eps={a['eps'] * 255:.1f}/255"]
    if pgd_kinds:
        described.append(f"{pgd_kinds}: {a['steps']} steps of {a['step'] * 255:.1f}/255, random start, "
                         f"{a['restarts']} restart(s)")
    if "eot" in ran:
        described.append(f"eot = {a['eot_draws']} noise draws per gradient")
    if "adaptive" in ran:
        described.append(f"adaptive = PGD on the log mean softmax of {a['adaptive_samples']} copies")
    if "adaptive-logits" in ran:
        described.append(f"adaptive-logits = PGD on the mean logits of {a['adaptive_samples']} copies")
    if ran & {"apgd-ce", "apgd-dlr"}:  # only where APGD ran: its settings are recorded either way
        described.append(f"apgd = torchattacks' APGD, {a.get('apgd_steps', '-')} steps, EOT {a.get('apgd_eot', '-')}")
    lines = [
        f"### {report['model']}: what m buys, {report['data']['images']} test images "
        f"({report['data']['encoding']} encoding), 95% intervals",
        "",
        f"Attacks: {'; '.join(described)}. worst = right under every attack run. "
        + (f"Aggregation rules: {', '.join(rules)}, each reading the same noisy copies (the checkpoint's: "
           f"{report['smoothing']['aggregation']})." if several else f"Aggregation: {rules[0]}."),
        "",
        "**Accuracy (%)**",
        "",
        *table(lambda r: True, _cell),
    ]
    gains = report.get("gain_over_m1", [])
    if gains:
        lines += ["", f"**Gain over m={samples[0]} (points, same adversarial images, paired 95% interval)**", "",
                  *head(samples[1:])]
        for k in sorted({key(g) for g in gains}):
            by_m = {g["samples"]: g for g in gains if key(g) == k}
            lines.append(label(k) + " | ".join(
                f"{100 * by_m[m]['difference']:+.1f} [{100 * by_m[m]['ci95'][0]:+.1f}, {100 * by_m[m]['ci95'][1]:+.1f}]"
                for m in samples[1:]) + " |")
    if any("agreement" in r for r in results):
        lines += ["", "**Repeatability: two independent answers agree (%)**", "",
                  *table(lambda r: "agreement" in r, lambda r: _cell(r, "agreement", "agreement_ci95"))]
    cert = report.get("certified", [])
    if cert:
        c = report["certify"]
        radii = sorted({r["radius"] for r in cert})
        lines += ["", f"**Certified accuracy (%) at L2 radius ({c['space']} space), CERTIFY with n0 = n = m, "
                      f"alpha = {c['alpha']}**", "",
                  "| sigma | m | " + " | ".join(f"r={r:g}" for r in radii) + " |", "|---|---|" + "---|" * len(radii)]
        for sigma, m in sorted({(r["sigma"], r["samples"]) for r in cert}):
            by_r = {r["radius"]: r for r in cert if (r["sigma"], r["samples"]) == (sigma, m)}
            lines.append(f"| {sigma:g} | {m} | " + " | ".join(_cell(by_r[r]) for r in radii) + " |")
    lat = latency_by_m(report)
    lines += ["", f"Latency of one prediction (one image, {report['machine']['device']}, "
                  f"{report['machine']['threads']} threads): "
              + ", ".join(f"m={m}: {lat[m]:.1f} ms" for m in samples), "",
              f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Three panels against m: accuracy (clean, each attack, worst case), repeatability, certified accuracy;
    latency dashed on the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    samples = sorted({r["samples"] for r in results})
    rules = list(dict.fromkeys(rule_of(r, report) for r in results))
    several = len(rules) > 1
    if several:  # a colour per rule, and only clean, adaptive and the worst case (else every attack)
        ran = {r["attack"] for r in results}
        results = [r for r in results if r["attack"] in ({"clean", "adaptive", WORST} if WORST in ran else ran)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in ((axes[0], "accuracy", "accuracy (%)"), (axes[1], "agreement", "two answers agree (%)")):
        for sigma, rule, attack in sorted({(r["sigma"], rule_of(r, report), r["attack"]) for r in results if key in r},
                                          key=lambda k: (k[0], rules.index(k[1]), _order(k[2]))):
            pts = sorted((r["samples"], r[key]) for r in results
                         if (r["sigma"], rule_of(r, report), r["attack"]) == (sigma, rule, attack) and key in r)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o",
                    label=f"{attack}, σ={sigma:g}" + (f", {rule}" if several else ""),
                    color=f"C{rules.index(rule)}" if several else None,
                    linestyle=":" if several and attack != "clean" else "-", markersize=4 if attack == WORST else 6,
                    linewidth=2.5 if attack == WORST else 1.2)
        ax.set_ylabel(title)
    lat = axes[0].twinx()
    latency = latency_by_m(report)
    lat.plot(samples, [latency[m] for m in samples], "k--", label="latency")
    lat.set_ylabel("latency of one prediction (ms, dashed)")
    for sigma, radius in sorted({(r["sigma"], r["radius"]) for r in report.get("certified", [])}):
        pts = sorted((r["samples"], r["accuracy"]) for r in report["certified"]
                     if r["sigma"] == sigma and r["radius"] == radius)
        axes[2].plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=f"r={radius:g}, σ={sigma:g}")
    axes[2].set_ylabel("certified accuracy (%)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("m (noisy copies per prediction)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{report['model']}: what m buys ({report['data']['images']} images, "
                 f"{report['data']['encoding']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--report" in argv:
        from training import report

        report.main([a for a in argv if a != "--report"])
        return
    if "--sequential" in argv:
        from training import sequential_eval

        sequential_eval.main([a for a in argv if a != "--sequential"])
        return
    args = build_parser().parse_args(argv)
    out = Path(args.output) if args.output else Path(args.checkpoint) / "eval"
    if problem := unwritable(out):
        raise SystemExit(f"siam evaluate: cannot write the results to {out}: {problem}")
    report = evaluate(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    (out / "eval.md").write_text(markdown)
    plot(report, out / "eval.png")
    print(markdown)
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}")


if __name__ == "__main__":
    main()
