"""What sequential sampling saves and what it costs (``siam evaluate CHECKPOINT --sequential``).

On clean test images and on images attacked with the adaptive attack (PGD on the log of the mean softmax
over ``--adaptive-samples`` noisy copies: the quantity the sequential vote estimates, so the attack aims
at the sequentially sampled answer itself), each image is answered twice: sequentially
(``Smooth.predict_sequential``: rounds of 16 doubling up to ``--budget`` copies, stopping at
``--confidence``) and with the whole fixed budget. Reported, with 95% intervals: copies used (mean, p50,
p95, max) for clean and attacked images, the share decided, agreement of the two answers' labels,
accuracy of both, and images per second of both on this machine (library path, same run). With
``--stalling-images`` some images are also attacked at the stopping rule itself: the same PGD, maximising
minus the gap between the top two classes of the mean softmax, so that the vote stays close and the
image spends its whole budget (a cost attack, not an accuracy one).

Writes ``sequential.json``, ``sequential.md`` and ``sequential.png`` (the two distributions of copies
used) into ``--output``.
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
from tqdm import tqdm

from models.checkpoint import load_checkpoint
from models.cli_types import non_negative_float, non_negative_int, positive_int, stopping_confidence, unwritable
from models.sequential import rounds
from models.smooth import Smooth
from training.attacks import cross_entropy, pgd, smoothed_log_probs, undecided
from training.data import add_data_arguments, load_split, to_float
from training.measure import clopper_pearson
from training.train import resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="siam evaluate --sequential", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint folder")
    add_data_arguments(p)
    p.add_argument("--images", type=positive_int, default=1000, help="clean test images (default: %(default)s)")
    p.add_argument("--attacked-images", type=non_negative_int, default=500,
                   help="of those, how many are also attacked (default: %(default)s)")
    p.add_argument("--stalling-images", type=non_negative_int, default=0,
                   help="of those, how many are also attacked at the stopping rule: PGD that levels the top two "
                        "classes so that the vote stays undecided (default: %(default)s)")
    p.add_argument("--budget", type=positive_int, default=256,
                   help="the most copies an image may use (default: %(default)s)")
    p.add_argument("--confidence", type=stopping_confidence, default=0.999,
                   help="stopping confidence (default: %(default)s)")
    p.add_argument("--eps", type=non_negative_float, default=8 / 255)
    p.add_argument("--step", type=non_negative_float, default=2 / 255)
    p.add_argument("--steps", type=positive_int, default=7)
    p.add_argument("--adaptive-samples", type=positive_int, default=8, help="copies in the attack's soft output")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seeds the subset, the attack and the noise")
    p.add_argument("--output", default=None, help="output folder (default: <checkpoint>/eval/sequential)")
    return p


def share(flags: torch.Tensor) -> dict[str, Any]:
    k, n = int(flags.sum()), int(flags.numel())
    return {"value": k / n if n else float("nan"), "ci95": list(clopper_pearson(k, n))}


def summarize_used(used: torch.Tensor) -> dict[str, float]:
    u = used.float()
    return {"mean": float(u.mean()), "p50": float(u.quantile(0.5)), "p95": float(u.quantile(0.95)),
            "max": float(u.max())}


def answer_both(smooth: Smooth, x: torch.Tensor, budget: int, confidence: float,
                clock: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequential labels, copies used, decided flags, and the fixed-budget labels, timing each path."""
    start = time.perf_counter()
    answers = smooth.predict_sequential(x, budget, confidence)
    clock["sequential"] += time.perf_counter() - start
    start = time.perf_counter()
    fixed = smooth.predict_batch(x, budget)
    clock["fixed"] += time.perf_counter() - start
    return (torch.tensor([p.label for p, _ in answers]), torch.tensor([p.samples for p, _ in answers]),
            torch.tensor([d for _, d in answers]), torch.tensor([p.label for p in fixed]))


KINDS = ("clean", "attacked", "stalling")


def run_sequential(smooth: Smooth, x: torch.Tensor, y: torch.Tensor, budget: int, confidence: float,
                   attack: dict[str, Any], attacked_images: int, batch_size: int,
                   bar: tqdm | None = None, stalling_images: int = 0) -> dict[str, Any]:
    """Answer ``x`` (floats in [0, 1]), the first ``attacked_images`` of them attacked by the adaptive
    attack (``attack``: eps, step, steps, soft_output_copies), and the first ``stalling_images`` attacked
    by the same PGD aimed at the stopping rule (:func:`training.attacks.undecided`: the top two classes
    level, so that the vote never stops), both sequentially and with the whole budget; per kind: copies
    used, decided, agreement, accuracies and images per second."""
    parts: dict[str, dict[str, list[torch.Tensor]]] = {
        kind: {"labels": [], "used": [], "decided": [], "fixed": [], "truth": []} for kind in KINDS}
    clocks = {kind: {"sequential": 0.0, "fixed": 0.0} for kind in parts}
    attack_fn = smoothed_log_probs(smooth, attack["soft_output_copies"])
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size].cpu()
        batches = [("clean", xb, yb)]
        for kind, count, loss in (("attacked", attacked_images, cross_entropy),
                                  ("stalling", stalling_images, undecided)):
            k = max(0, min(len(yb), count - i))
            if k:
                adv = pgd(attack_fn, xb[:k], yb[:k].to(xb.device), eps=attack["eps"], step=attack["step"],
                          steps=attack["steps"], loss=loss)
                batches.append((kind, adv, yb[:k]))
        for kind, images, truth in batches:
            labels, used, decided, fixed = answer_both(smooth, images, budget, confidence, clocks[kind])
            for key, value in (("labels", labels), ("used", used), ("decided", decided), ("fixed", fixed),
                               ("truth", truth)):
                parts[kind][key].append(value)
            if bar is not None:
                bar.update(len(truth))
    results: dict[str, Any] = {}
    for kind, p in parts.items():
        if not p["labels"]:
            continue
        labels, used, decided, fixed, truth = (torch.cat(p[k]) for k in ("labels", "used", "decided", "fixed", "truth"))
        results[kind] = {
            "images": int(labels.numel()), "copies_used": summarize_used(used),
            "copies_used_decided": summarize_used(used[decided]) if decided.any() else None,
            "copies_used_all": used.tolist(), "decided": share(decided),
            "agreement_with_fixed": share(labels == fixed), "accuracy_sequential": share(labels == truth),
            "accuracy_fixed": share(fixed == truth),
            "images_per_s": {path: labels.numel() / max(seconds, 1e-9) for path, seconds in clocks[kind].items()},
        }
    return results


def evaluate_sequential(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, 0)
    model, manifest = load_checkpoint(args.checkpoint, device)
    spec = manifest.spec
    smooth = Smooth(model, spec.smoothing, spec.architecture.num_classes)
    test = load_split(args.data, "test", args.cache_dir).subset(args.images, seed=args.seed)
    torch.manual_seed(args.seed)
    attack = {"name": "adaptive", "norm": "Linf", "eps": args.eps, "step": args.step, "steps": args.steps,
              "soft_output_copies": args.adaptive_samples}
    attacked, stalling = min(args.attacked_images, len(test)), min(args.stalling_images, len(test))
    with tqdm(total=len(test) + attacked + stalling, desc="sequential", unit="img", dynamic_ncols=True) as bar:
        results = run_sequential(smooth, to_float(test.images.to(device)), test.labels, args.budget,
                                 args.confidence, attack, attacked, args.batch_size, bar, stalling)
    return {
        "command": "siam evaluate " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["evaluate"] else sys.argv[1:]),
        "model": manifest.name, "weights_sha256": manifest.weights.sha256, "smoothing": spec.smoothing.model_dump(),
        "budget": args.budget, "confidence": args.confidence,
        "data": {"source": test.source, "sha256": test.checksum, "images": len(test), "subset_seed": args.seed},
        "attack": attack,
        "machine": {"device": str(device), "platform": platform.platform(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "results": results,
    }


def pct(entry: dict[str, Any]) -> str:
    lo, hi = entry["ci95"]
    return f"{100 * entry['value']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def table(results: dict[str, Any]) -> list[str]:
    """The Markdown table of ``run_sequential``'s results, a row per kind of image."""
    lines = ["| images | n | copies used: mean / p50 / p95 / max | decided | agrees with fixed | accuracy, "
             "sequential | accuracy, fixed | images/s, sequential / fixed |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, r in results.items():
        u = r["copies_used"]
        speed = r["images_per_s"]
        lines.append(f"| {kind} | {r['images']} | {u['mean']:.1f} / {u['p50']:.0f} / {u['p95']:.0f} / {u['max']:.0f} "
                     f"| {pct(r['decided'])} | {pct(r['agreement_with_fixed'])} | {pct(r['accuracy_sequential'])} "
                     f"| {pct(r['accuracy_fixed'])} | {speed['sequential']:.1f} / {speed['fixed']:.1f} "
                     f"({speed['sequential'] / speed['fixed']:.1f}x) |")
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"### {report['model']}: sequential sampling, budget {report['budget']}, confidence "
             f"{report['confidence']}", "",
             f"`{report['command']}` ({report['machine']['device']}, {report['machine']['threads']} threads). "
             f"Attacked: adaptive PGD-{report['attack']['steps']} on the log mean softmax of "
             f"{report['attack']['soft_output_copies']} copies, L-inf {report['attack']['eps'] * 255:.0f}/255."
             + (" Stalling: the same PGD maximising minus the gap between the top two classes (aimed at the "
                "stopping rule: a close vote spends the whole budget)." if "stalling" in report["results"] else ""),
             "", *table(report["results"])]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    schedule = rounds(report["budget"])
    bins = [0, *(sum(schedule[:k + 1]) for k in range(len(schedule)))]  # a bin per round's end
    for kind, r in report["results"].items():
        ax.hist(r["copies_used_all"], bins=[b + 0.5 for b in bins], alpha=0.6, density=True,
                label=f"{kind} (mean {r['copies_used']['mean']:.0f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"copies used (budget {report['budget']})")
    ax.set_ylabel("share of images")
    ax.set_title(f"{report['model']}: copies used at confidence {report['confidence']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.output) if args.output else Path(args.checkpoint) / "eval" / "sequential"
    if problem := unwritable(out):
        raise SystemExit(f"siam evaluate --sequential: cannot write the results to {out}: {problem}")
    report = evaluate_sequential(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sequential.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    (out / "sequential.md").write_text(markdown)
    plot(report, out / "sequential.png")
    print(markdown)
    print(f"wrote {out / 'sequential.json'}, {out / 'sequential.md'}, {out / 'sequential.png'}")
