"""Accuracy of a smoothed checkpoint, clean and under attack, against m and sigma (``siam evaluate``).

For each sigma the adversarial examples are crafted once per attack, then the smoothed classifier
answers them with each m (the aggregation rule stored in the checkpoint). Attacks (all L-inf):

* ``pgd``: the paper's PGD-k, gradient from one noise draw per step;
* ``eot``: PGD-k with the gradient averaged over ``--eot`` noise draws (EOT);
* ``adaptive``: PGD-k on the smoothed soft output itself, log of the mean softmax over
  ``--adaptive-samples`` copies (Salman et al., 2019).

Every accuracy comes with a 95% Clopper-Pearson interval. Writes ``eval.json``, ``eval.md`` and
``eval.png`` (accuracy and latency against m) into ``--output``.

``siam evaluate --report [--quick]`` writes the full robustness report instead (sigma and m chosen on
validation images, stronger and black-box attacks, an eps sweep, CERTIFY); see
``siam evaluate --report --help``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import beta
from tqdm import tqdm

from models.checkpoint import load_checkpoint
from models.smooth import Smooth
from training.attacks import pgd, smoothed_log_probs
from training.data import load_split, to_float
from training.train import DEFAULT_DATA, resolve_device

ATTACKS = ("clean", "pgd", "eot", "adaptive")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="siam evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint folder (manifest.json + weights.safetensors)")
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR source, as for siam train (default: %(default)s)")
    p.add_argument("--cache-dir", default="data-cache")
    p.add_argument("--images", type=int, default=1000, help="test images (a fixed random subset; default %(default)s)")
    p.add_argument("--samples", default="1,4,16", help="comma-separated m values (default: %(default)s)")
    p.add_argument("--sigmas", default=None, help="comma-separated sigmas (default: the checkpoint's)")
    p.add_argument("--attacks", default="clean,pgd,eot,adaptive", help=f"subset of {','.join(ATTACKS)}")
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--step", type=float, default=2 / 255)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--eot", type=int, default=8, help="noise draws per gradient for the eot attack")
    p.add_argument("--adaptive-samples", type=int, default=8, help="copies in the adaptive attack's soft output")
    p.add_argument("--batch-size", type=int, default=200, help="images per attack batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seeds the subset choice, the attacks' and the noise draws")
    p.add_argument("--output", default=None, help="output folder (default: <checkpoint>/eval)")
    p.add_argument("--quick", action="store_true", help="100 images, m in 1,4, PGD and EOT only")
    p.add_argument("--report", action="store_true",
                   help="write the robustness report (reports/robustness/) instead; "
                        "`siam evaluate --report --help` lists its options")
    return p


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided exact binomial confidence interval for k successes out of n."""
    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return low, high


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
    raise ValueError(f"unknown attack {attack!r}")


def latency_ms(smooth: Smooth, x: torch.Tensor, samples: int, repeats: int = 5) -> float:
    """Median wall time of one smoothed prediction of one image with ``samples`` copies."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        smooth.predict_batch(x[:1], samples)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # first run is a warm-up
            times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.images, args.samples, args.attacks = min(args.images, 100), "1,4", "clean,pgd,eot"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, 0)
    model, manifest = load_checkpoint(args.checkpoint, device)
    spec = manifest.spec
    samples = [int(m) for m in args.samples.split(",")]
    sigmas = [float(s) for s in args.sigmas.split(",")] if args.sigmas else [spec.smoothing.sigma]
    attacks = [a.strip() for a in args.attacks.split(",")]
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise SystemExit(f"unknown attacks {sorted(unknown)}; choose from {', '.join(ATTACKS)}")
    test = load_split(args.data, "test", args.cache_dir).subset(args.images, seed=args.seed)
    torch.manual_seed(args.seed)

    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(sigmas) * len(attacks) * len(test), desc="evaluate", unit="img", dynamic_ncols=True)
    for sigma in sigmas:
        smooth = Smooth(model, spec.smoothing.model_copy(update={"sigma": sigma}), spec.architecture.num_classes)
        for attack in attacks:
            correct = dict.fromkeys(samples, 0)
            for i in range(0, len(test), args.batch_size):
                x = to_float(test.images[i:i + args.batch_size].to(device))
                y = test.labels[i:i + args.batch_size].to(device)
                adv = craft(attack, smooth, x, y, args)
                for m in samples:
                    preds = smooth.predict_batch(adv, m)
                    correct[m] += sum(int(p.label == t) for p, t in zip(preds, y.tolist(), strict=True))
                bar.update(len(y))
            for m in samples:
                low, high = clopper_pearson(correct[m], len(test))
                rows.append({"sigma": sigma, "attack": attack, "samples": m, "accuracy": correct[m] / len(test),
                             "ci95": [low, high], "correct": correct[m], "images": len(test)})
    bar.close()
    probe = to_float(test.images[:1].to(device))
    base = Smooth(model, spec.smoothing, spec.architecture.num_classes)
    latency = {m: latency_ms(base, probe, m) for m in samples}
    return {
        "command": "siam evaluate " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["evaluate"] else sys.argv[1:]),
        "checkpoint": str(args.checkpoint), "model": manifest.name, "weights_sha256": manifest.weights.sha256,
        "smoothing": spec.smoothing.model_dump(), "noise_layers": spec.noise_layers.model_dump(),
        "data": {"source": test.source, "sha256": test.checksum, "encoding": test.encoding,
                 "images": len(test), "subset_seed": args.seed},
        "attack": {"norm": "Linf", "eps": args.eps, "step": args.step, "steps": args.steps,
                   "restarts": args.restarts, "eot_draws": args.eot, "adaptive_samples": args.adaptive_samples},
        "machine": {"device": str(device), "platform": platform.platform(), "processor": platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "latency_ms_one_image": latency, "results": rows,
    }


def to_markdown(report: dict[str, Any]) -> str:
    samples = sorted({r["samples"] for r in report["results"]})
    a = report["attack"]
    lines = [
        f"### {report['model']} — accuracy (%) vs m, {report['data']['images']} test images "
        f"({report['data']['encoding']} encoding), 95% Clopper-Pearson intervals",
        "",
        f"Attacks: L-inf eps={a['eps'] * 255:.1f}/255, {a['steps']} steps of {a['step'] * 255:.1f}/255, "
        f"random start, {a['restarts']} restart(s); eot = {a['eot_draws']} noise draws per gradient; "
        f"adaptive = PGD on the log mean softmax of {a['adaptive_samples']} copies. "
        f"Aggregation: {report['smoothing']['aggregation']}.",
        "",
        "| sigma | attack | " + " | ".join(f"m={m}" for m in samples) + " |",
        "|---|---|" + "---|" * len(samples),
    ]
    keys = sorted({(r["sigma"], r["attack"]) for r in report["results"]},
                  key=lambda k: (k[0], ATTACKS.index(k[1])))
    for sigma, attack in keys:
        cells = []
        for m in samples:
            r = next(r for r in report["results"] if (r["sigma"], r["attack"], r["samples"]) == (sigma, attack, m))
            cells.append(f"{100 * r['accuracy']:.1f} [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]")
        lines.append(f"| {sigma:g} | {attack} | " + " | ".join(cells) + " |")
    lat = report["latency_ms_one_image"]
    lines += ["", f"Latency of one prediction (one image, {report['machine']['device']}, "
                  f"{report['machine']['threads']} threads): "
              + ", ".join(f"m={m}: {lat[m]:.1f} ms" for m in samples), "",
              f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    samples = sorted({r["samples"] for r in report["results"]})
    for sigma, attack in sorted({(r["sigma"], r["attack"]) for r in report["results"]}):
        pts = sorted((r["samples"], r["accuracy"]) for r in report["results"]
                     if r["sigma"] == sigma and r["attack"] == attack)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=f"{attack}, σ={sigma:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m (noisy copies per prediction)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    lat = ax.twinx()
    lat.plot(samples, [report["latency_ms_one_image"][m] for m in samples], "k--", label="latency")
    lat.set_ylabel("latency of one prediction (ms, dashed)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{report['model']}: robustness vs cost ({report['data']['images']} images, "
                 f"{report['data']['encoding']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--report" in argv:
        from training import report

        report.main([a for a in argv if a != "--report"])
        return
    args = build_parser().parse_args(argv)
    report = evaluate(args)
    out = Path(args.output) if args.output else Path(args.checkpoint) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    (out / "eval.md").write_text(markdown)
    plot(report, out / "eval.png")
    print(markdown)
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}")


if __name__ == "__main__":
    main()
