"""The robustness report (``siam evaluate --report``): every shipped model against attacks that adapt.

For each checkpoint it measures, on the CIFAR-10 test split (the JPEG encoding by default):

1. validation: sigma and m are chosen on images held out of the *train* split (the ones the checkpoint
   recorded with ``siam train --val-images``, else a fixed random choice that the report says the
   model saw in training), never on test images;
2. the trade-off grid: clean, PGD-k (the paper's attack, gradient from one noise draw), EOT-PGD and the
   adaptive attack on the smoothed soft output (Salman et al.) for every sigma and every m, with the
   latency of one prediction at each m measured by this command on this machine;
3. stronger attacks at the chosen sigma: EOT with more draws, 50-step EOT-PGD with restarts, APGD-CE
   and APGD-DLR with EOT (AutoAttack's protocol for randomized defenses, torchattacks' implementation),
   a transfer attack from the noise-free base model, and an eps sweep that must fall to ~0%;
4. NAttack (Li et al., 2019), a query-only black-box attack, on a subset;
5. Cohen et al.'s CERTIFY: certified L2 accuracy at several radii;
6. a discussion generated from the numbers: strongest attack, signs of gradient masking, and the
   comparison with the paper (60.4% under PGD) and PNI (84.9% clean, 45.9% PGD).

Every accuracy carries a 95% Clopper-Pearson interval. The test images of every part are prefixes of
one fixed random permutation (``--seed``), so the per-image worst case over attacks is well defined.
Writes ``report.md``, ``report.json`` and PNG figures into ``--output/<model>/`` (``.../quick/`` with
``--quick``), and an index ``--output/README.md``.

``--quick`` shrinks every part (the presets are listed at the end of ``--help``) to fit 15 minutes on
two CPU cores for a ResNet-20 (about 9 minutes with one thread next to a training run). The full report
is a long job, roughly 2 million input-gradient and 10 million forward passes for a ResNet-20 (several
hours on two idle CPU cores; NAttack's share grows with the chosen m, which every query pays), meant for
a quiet machine or a GPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from scipy.stats import norm
from tqdm import tqdm

from models.checkpoint import Manifest, load_checkpoint
from models.cli_types import (
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
    stopping_confidence_or_off,
    unwritable,
)
from models.resnet import Classifier
from models.smooth import Smooth
from training.attacks import apgd, pgd, smoothed_log_probs, smoothed_probabilities
from training.data import Dataset, add_data_arguments, load_split, to_float
from training.measure import latency_ms
from training.nattack import nattack
from training.report_render import render_markdown, render_plots, write_index
from training.robustness import (
    accuracy_entry,
    certified_accuracy,
    choose_operating_point,
    correct_by_m,
    eps_sweep,
    noise_free,
    sweep_problems,
)
from training.sequential_eval import run_sequential
from training.train import resolve_device, validation_record

FULL: dict[str, Any] = {
    "samples": "1,2,4,8,16,32,64,128,256", "val_images": 500, "test_images": 1000, "strong_images": 500,
    "nattack_images": 50, "certify_images": 300, "restarts": 5, "sweep_eps": "0,1,2,4,8,16,32,64",
    "sweep_steps": 20, "sweep_eot": 8, "nattack_population": 200, "nattack_queries": 10_000,
    "nattack_samples": 0, "certify_n": 2000, "certify_sigmas": "all", "latency_repeats": 10,
    "apgd_steps": 100, "apgd_eot": 20,
}
QUICK: dict[str, Any] = {
    "samples": "1,2,4,8,16,32,64", "val_images": 50, "test_images": 100, "strong_images": 25,
    "nattack_images": 8, "certify_images": 20, "restarts": 2, "sweep_eps": "0,2,4,8,16,32,64",
    "sweep_steps": 10, "sweep_eot": 4, "nattack_population": 100, "nattack_queries": 1500,
    "nattack_samples": 4, "certify_n": 1000, "certify_sigmas": "checkpoint", "latency_repeats": 5,
    "apgd_steps": 20, "apgd_eot": 2,
}
SECTION_SEEDS = {"validation": 1, "grid": 2, "strong": 3, "nattack": 4, "certify": 5}


def build_parser() -> argparse.ArgumentParser:
    epilog = "presets (flags override them):\n" + "\n".join(
        f"  {name}: " + ", ".join(f"{k}={v}" for k, v in preset.items()) for name, preset in (("full", FULL),
                                                                                           ("--quick", QUICK)))
    p = argparse.ArgumentParser(prog="siam evaluate --report", description=__doc__, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", help="checkpoint folders (default: every checkpoints/*/ with a manifest)")
    p.add_argument("--quick", action="store_true", help="the small preset that fits 15 minutes on 2 CPU cores")
    g = p.add_argument_group("data and output")
    add_data_arguments(g)
    g.add_argument("--output", default="reports/robustness",
                   help="report root; each model gets <output>/<model>[/quick] (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="test subset permutation and every noise draw (default 0)")
    g.add_argument("--val-seed", type=int, default=2019,
                   help="choice of validation images when the checkpoint recorded no held-out split")
    g.add_argument("--device", default="auto")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (share the machine politely)")
    g.add_argument("--max-rows", type=positive_int, default=512, help="noisy rows per attack batch (memory cap)")
    g = p.add_argument_group("sizes (default: full preset / --quick preset)")
    for name, help_ in (("val_images", "validation images (from the train split)"),
                        ("test_images", "test images for the sigma x attack x m grid"),
                        ("strong_images", "first test images for the stronger attacks and the eps sweep"),
                        ("nattack_images", "first test images for NAttack"),
                        ("certify_images", "first test images for CERTIFY")):
        g.add_argument("--" + name.replace("_", "-"), type=non_negative_int, default=None,
                       help=f"{help_} ({FULL[name]} / {QUICK[name]})")
    g.add_argument("--samples", default=None, help=f"m values ({FULL['samples']} / {QUICK['samples']})")
    g.add_argument("--sigmas", default=None, help="sigmas to compare (default: the checkpoint's x 0.5, 1, 2)")
    g = p.add_argument_group("white-box attacks (L-inf)")
    g.add_argument("--eps", type=non_negative_float, default=8 / 255)
    g.add_argument("--step", type=non_negative_float, default=2 / 255, help="PGD-k step")
    g.add_argument("--steps", type=positive_int, default=7, help="k of the paper's PGD-k (default %(default)s)")
    g.add_argument("--eot", type=positive_int, default=8, help="noise draws per gradient, grid EOT attack")
    g.add_argument("--eot-large", type=positive_int, default=32, help="noise draws per gradient, stronger EOT attack")
    g.add_argument("--adaptive-samples", type=positive_int, default=8,
                   help="copies in the adaptive attack's soft output")
    g.add_argument("--strong-steps", type=positive_int, default=50)
    g.add_argument("--strong-step", type=non_negative_float, default=2 / 255)
    g.add_argument("--strong-eot", type=positive_int, default=8, help="noise draws per gradient of the 50-step attack")
    g.add_argument("--restarts", type=positive_int, default=None, help=f"restarts of the 50-step attack "
                                                              f"({FULL['restarts']} / {QUICK['restarts']})")
    g.add_argument("--apgd-steps", type=non_negative_int, default=None,
                   help=f"APGD-CE and APGD-DLR iterations ({FULL['apgd_steps']} / {QUICK['apgd_steps']}; 0: no APGD)")
    g.add_argument("--apgd-eot", type=int, default=None,
                   help=f"noise draws per APGD gradient ({FULL['apgd_eot']} / {QUICK['apgd_eot']})")
    g.add_argument("--transfer-steps", type=positive_int, default=50, help="PGD steps on the noise-free surrogate")
    g.add_argument("--sweep-eps", default=None, help=f"eps sweep in 1/255 units ({FULL['sweep_eps']} / "
                                                     f"{QUICK['sweep_eps']})")
    g.add_argument("--sweep-steps", type=positive_int, default=None, help="EOT-PGD steps per eps, step 2.5 eps / steps")
    g.add_argument("--sweep-eot", type=positive_int, default=None, help="noise draws per gradient in the sweep")
    g = p.add_argument_group("NAttack (black box, queries the smoothed classifier's probabilities)")
    g.add_argument("--nattack-population", type=positive_int, default=None)
    g.add_argument("--nattack-queries", type=positive_int, default=None, help="query budget per image")
    g.add_argument("--nattack-samples", type=int, default=None,
                   help="m of the queried smoothed classifier (0: the chosen m; quick: 4)")
    g.add_argument("--nattack-sigma", type=float, default=0.1)
    g.add_argument("--nattack-lr", type=float, default=0.02)
    g.add_argument("--nattack-kappa", type=float, default=0.5,
                   help="log-probability margin of a confident mistake before an image counts as done (the paper "
                        "stops at 0; against a randomized model a margin makes the mistake survive fresh noise)")
    g = p.add_argument_group("CERTIFY (Cohen et al.)")
    g.add_argument("--certify-n0", type=positive_int, default=100)
    g.add_argument("--certify-n", type=positive_int, default=None)
    g.add_argument("--certify-alpha", type=probability, default=0.001)
    g.add_argument("--certify-sigmas", choices=["checkpoint", "all"], default=None,
                   help="certify at the checkpoint's sigma only, or at every sigma of the grid")
    g.add_argument("--radii", default="0,0.05,0.1,0.15,0.25,0.5", help="L2 radii, pixel space [0, 1]")
    g = p.add_argument_group("choice and latency")
    g.add_argument("--m-tolerance", type=float, default=0.01,
                   help="smallest m within this much robust validation accuracy of the best m")
    g.add_argument("--latency-repeats", type=positive_int, default=None)
    g = p.add_argument_group("sequential sampling (the service's ?confidence=)")
    g.add_argument("--sequential-confidence", type=stopping_confidence_or_off, default=0.999,
                   help="answer the test images (and the strong attack's images, attacked by the adaptive attack "
                        "and by PGD at the stopping rule) sequentially, with the largest m as the budget, beside "
                        "the fixed budget; 0: skip "
                        "(default %(default)s)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every size the user left out from the chosen preset."""
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def default_sigmas(sigma: float) -> list[float]:
    return [sigma / 2, sigma, 2 * sigma] if sigma > 0 else [0.0, 0.0625, 0.125]


def batched(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
            rows_per_image: int, max_rows: int, bar: tqdm | None = None) -> torch.Tensor:
    """Run an attack in batches whose noisy rows fit ``max_rows``."""
    size = max(1, max_rows // max(rows_per_image, 1))
    out = []
    for i in range(0, x.shape[0], size):
        out.append(fn(x[i:i + size], y[i:i + size]))
        if bar is not None:
            bar.update(len(out[-1]))
    return torch.cat(out) if out else x


def smooth_at(model: Classifier, manifest: Manifest, sigma: float) -> Smooth:
    spec = manifest.spec
    return Smooth(model, spec.smoothing.model_copy(update={"sigma": sigma}), spec.architecture.num_classes)


def grid_attacks(smooth: Smooth, args: argparse.Namespace) -> dict[str, tuple[int, Callable[..., torch.Tensor]]]:
    """Name -> (noisy rows per image, attack) for the sigma x m grid."""
    kw = {"eps": args.eps, "step": args.step, "steps": args.steps}
    f = smooth.forward_noisy
    return {
        "clean": (1, lambda x, y: x),
        f"pgd{args.steps}": (1, lambda x, y: pgd(f, x, y, **kw)),
        f"eot{args.eot}-pgd{args.steps}": (args.eot, lambda x, y: pgd(f, x, y, eot=args.eot, **kw)),
        f"adaptive{args.adaptive_samples}-pgd{args.steps}": (
            args.adaptive_samples, lambda x, y: pgd(smoothed_log_probs(smooth, args.adaptive_samples), x, y, **kw)),
    }


def validation_set(manifest: Manifest, args: argparse.Namespace) -> tuple[Dataset, dict[str, Any]]:
    """Validation images from the train split: the checkpoint's held-out ones if it recorded them."""
    train = load_split(args.data, "train", args.cache_dir)
    data = manifest.training.get("data", {})
    recorded = data.get("validation")
    same_data = data.get("sha256") == train.checksum
    if recorded and same_data:
        held, _ = train.hold_out(recorded["images"], recorded["seed"])
        if validation_record(held, recorded["seed"])["images_sha256"] != recorded.get("images_sha256"):
            raise SystemExit("the held-out validation images do not match the checkpoint's record")
        info = {"split": "train", "held_out_in_training": True, "seed": recorded["seed"], "seen_in_training": "no"}
    else:
        held, _ = train.hold_out(min(args.val_images, len(train) - 1), args.val_seed)
        seen = "yes" if same_data and manifest.training.get("config", {}).get("train_images") is None else "possibly"
        info = {"split": "train", "held_out_in_training": False, "seed": args.val_seed, "seen_in_training": seen}
    held = held.subset(args.val_images, seed=args.seed)
    return held, {**info, "images": len(held), "source": train.source, "sha256": train.checksum}


def run_validation(model: Classifier, manifest: Manifest, val: Dataset, sigmas: list[float],
                   samples: list[int], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Clean and EOT-PGD accuracy on the validation images for every sigma and m; picks sigma and m."""
    torch.manual_seed(args.seed + SECTION_SEEDS["validation"])
    x, y = to_float(val.images.to(device)), val.labels.to(device)
    rows = []
    bar = tqdm(total=len(sigmas) * len(y), desc="validation (choose sigma, m)", unit="img", dynamic_ncols=True)
    for sigma in sigmas:
        smooth = smooth_at(model, manifest, sigma)
        rows_per, attack = grid_attacks(smooth, args)[f"eot{args.eot}-pgd{args.steps}"]
        adv = batched(attack, x, y, rows_per, args.max_rows, bar)
        clean, attacked = correct_by_m(smooth, x, y, samples), correct_by_m(smooth, adv, y, samples)
        for m in samples:
            rows.append({"sigma": sigma, "samples": m, "clean": accuracy_entry(clean[m]),
                         "robust": accuracy_entry(clean[m] & attacked[m])})
    bar.close()
    choice = choose_operating_point(
        [{"sigma": r["sigma"], "samples": r["samples"], "clean": r["clean"]["accuracy"],
          "robust": r["robust"]["accuracy"]} for r in rows], args.m_tolerance)
    return {"attack": f"eot{args.eot}-pgd{args.steps}", "rows": rows, "choice": choice}


def run_grid(model: Classifier, manifest: Manifest, x: torch.Tensor, y: torch.Tensor, sigmas: list[float],
             samples: list[int], args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[tuple, Any]]:
    """Every grid attack at every sigma, judged at every m; also returns per-image correctness."""
    torch.manual_seed(args.seed + SECTION_SEEDS["grid"])
    rows, correct = [], {}
    names = list(grid_attacks(smooth_at(model, manifest, sigmas[0]), args))
    bar = tqdm(total=len(sigmas) * len(names) * len(y), desc="grid (sigma x attack x m)", unit="img",
               dynamic_ncols=True)
    for sigma in sigmas:
        smooth = smooth_at(model, manifest, sigma)
        worst = None
        for name, (rows_per, attack) in grid_attacks(smooth, args).items():
            adv = batched(attack, x, y, rows_per, args.max_rows, bar)
            by_m = correct_by_m(smooth, adv, y, samples)
            correct[(sigma, name)] = by_m
            worst = by_m if worst is None else {m: worst[m] & by_m[m] for m in samples}
            rows += [{"sigma": sigma, "attack": name, "samples": m, **accuracy_entry(by_m[m])} for m in samples]
        correct[(sigma, "worst-case")] = worst
        rows += [{"sigma": sigma, "attack": "worst-case", "samples": m, **accuracy_entry(worst[m])} for m in samples]
    bar.close()
    return rows, correct


def run_strong(model: Classifier, manifest: Manifest, x: torch.Tensor, y: torch.Tensor, sigma: float,
               m_star: int, samples: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Stronger attacks and the eps sweep at the chosen sigma, on the first ``strong_images`` images."""
    torch.manual_seed(args.seed + SECTION_SEEDS["strong"])
    smooth = smooth_at(model, manifest, sigma)
    f = smooth.forward_noisy
    strong = f"pgd{args.strong_steps}-eot{args.strong_eot}-r{args.restarts}"
    attacks: dict[str, tuple[int, Callable[..., torch.Tensor]]] = {
        f"eot{args.eot_large}-pgd{args.steps}": (
            args.eot_large, lambda a, b: pgd(f, a, b, eps=args.eps, step=args.step, steps=args.steps,
                                            eot=args.eot_large)),
        strong: (args.strong_eot, lambda a, b: pgd(f, a, b, eps=args.eps, step=args.strong_step,
                                                   steps=args.strong_steps, restarts=args.restarts,
                                                   eot=args.strong_eot)),
    }
    for loss in ("ce", "dlr") if args.apgd_steps > 0 else ():  # AutoAttack's protocol for randomized models
        attacks[f"apgd-{loss}-{args.apgd_steps}-eot{args.apgd_eot}"] = (1, lambda a, b, loss=loss: apgd(
            f, model, a, b, loss=loss, eps=args.eps, steps=args.apgd_steps, eot=args.apgd_eot))
    sweep_eps = [e / 255 for e in floats(args.sweep_eps)]
    total = len(y) * (len(attacks) + 1 + sum(1 for e in sweep_eps if e > 0))
    bar = tqdm(total=total, desc=f"strong attacks (sigma={sigma:g})", unit="img", dynamic_ncols=True)
    rows, correct = [], {}
    for name, (rows_per, attack) in attacks.items():
        correct[name] = correct_by_m(smooth, batched(attack, x, y, rows_per, args.max_rows, bar), y, samples)
    with noise_free(model) as surrogate:
        adv = batched(lambda a, b: pgd(surrogate, a, b, eps=args.eps, step=args.strong_step,
                                       steps=args.transfer_steps), x, y, 1, args.max_rows, bar)
    correct["transfer"] = correct_by_m(smooth, adv, y, samples)
    for name, by_m in correct.items():
        rows += [{"attack": name, "samples": m, **accuracy_entry(by_m[m])} for m in samples]

    def sweep_attack(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
        return batched(lambda c, d: pgd(f, c, d, eps=eps, step=2.5 * eps / args.sweep_steps, steps=args.sweep_steps,
                                        eot=args.sweep_eot), a, b, args.sweep_eot, args.max_rows, bar)

    def judge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return correct_by_m(smooth, a, b, [m_star])[m_star]

    sweep = eps_sweep(sweep_attack, judge, x, y, sweep_eps)
    bar.close()
    return {"sigma": sigma, "images": len(y), "rows": rows, "correct": correct,
            "eps_sweep": {"attack": f"eot{args.sweep_eot}-pgd{args.sweep_steps}, step 2.5 eps/{args.sweep_steps}",
                          "samples": m_star, "rows": sweep, "problems": sweep_problems(sweep)}}


def run_nattack(model: Classifier, manifest: Manifest, x: torch.Tensor, y: torch.Tensor, sigma: float,
                m_star: int, samples: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """NAttack against the smoothed classifier's output probabilities, then judged at every m."""
    torch.manual_seed(args.seed + SECTION_SEEDS["nattack"])
    smooth = smooth_at(model, manifest, sigma)
    queried_m = args.nattack_samples or m_star
    bar = tqdm(total=len(y) * args.nattack_queries, desc=f"NAttack (m={queried_m})", unit="query",
               dynamic_ncols=True)
    result = nattack(smoothed_probabilities(smooth, queried_m), x, y, eps=args.eps,
                     population=args.nattack_population, sigma=args.nattack_sigma, lr=args.nattack_lr,
                     max_queries=args.nattack_queries, kappa=args.nattack_kappa,
                     generator=torch.Generator(x.device).manual_seed(args.seed),
                     progress=bar.update)
    bar.close()
    by_m = correct_by_m(smooth, result.adversarial, y, samples)
    return {"sigma": sigma, "images": len(y), "queried_samples": queried_m,
            "population": args.nattack_population, "max_queries": args.nattack_queries,
            "attacker_success": int(result.success.sum()), "mean_queries": float(result.queries.float().mean()),
            "max_linf": float((result.adversarial - x).abs().max()) if len(y) else 0.0,
            "rows": [{"samples": m, **accuracy_entry(by_m[m])} for m in samples], "correct": by_m}


def run_certify(model: Classifier, manifest: Manifest, test: Dataset, sigmas: list[float],
                args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Cohen's CERTIFY on the first ``certify_images`` test images at each sigma > 0."""
    torch.manual_seed(args.seed + SECTION_SEEDS["certify"])
    spec = manifest.spec
    chosen = [spec.smoothing.sigma] if args.certify_sigmas == "checkpoint" else sigmas
    chosen = [s for s in dict.fromkeys(chosen) if s > 0]
    # Radii are reported in pixel space; a sigma in normalized space certifies at least radius * min(std).
    scale = 1.0 if spec.smoothing.space == "pixel" else min(spec.normalization.std)
    images = test.images[: args.certify_images]
    out = []
    bar = tqdm(total=len(chosen) * len(images), desc="CERTIFY", unit="img", dynamic_ncols=True)
    for sigma in chosen:
        smooth = smooth_at(model, manifest, sigma)
        certs = []
        for img in images:
            certs.append(smooth.certify(to_float(img.to(device)), args.certify_n0, args.certify_n, args.certify_alpha))
            bar.update(1)
        labels = test.labels[: len(images)].tolist()
        out.append({"sigma": sigma, "space": spec.smoothing.space, "n0": args.certify_n0, "n": args.certify_n,
                    "alpha": args.certify_alpha, "images": len(images),
                    "max_radius": scale * sigma * float(norm.ppf(args.certify_alpha ** (1 / args.certify_n))),
                    "abstained": sum(c.abstained for c in certs),
                    "rows": certified_accuracy(certs, labels, floats(args.radii), scale)})
    bar.close()
    return out


def analyse(report: dict[str, Any], strong_correct: dict[str, Any], grid_correct: dict[tuple, Any],
            nattack_correct: dict[int, torch.Tensor] | None, sigma: float, m_star: int,
            args: argparse.Namespace) -> dict[str, Any]:
    """Per-image worst case at (sigma*, m*), the strongest attack, and the gradient-masking checks."""
    n_strong = report["strong"]["images"]
    white = {name: by_m[m_star][:n_strong] for (s, name), by_m in grid_correct.items()
             if s == sigma and name != "worst-case"}
    white.update({name: by_m[m_star] for name, by_m in strong_correct.items() if name != "transfer"})
    attacked = {k: v for k, v in white.items() if k != "clean"}
    accs = {k: accuracy_entry(v) for k, v in {**attacked, "transfer": strong_correct["transfer"][m_star]}.items()}
    strongest = min(accs, key=lambda k: accs[k]["accuracy"])
    white_worst = torch.stack(list(white.values())).all(0)
    worst = white_worst & strong_correct["transfer"][m_star]
    checks = []
    problems = report["strong"]["eps_sweep"]["problems"]
    checks.append({"check": "eps sweep falls monotonically to ~0%", "kind": "masking", "ok": not problems,
                   "detail": "; ".join(problems) or "accuracy falls with eps and is ~0% at the largest eps"})
    pgd_k = accs.get(f"pgd{args.steps}", {"accuracy": float("nan")})["accuracy"]
    best_white = min(a["accuracy"] for k, a in accs.items() if k != "transfer")
    transfer_only = int((white_worst & ~strong_correct["transfer"][m_star]).sum())
    checks.append({"check": "transfer attack is weaker than white-box", "kind": "masking",
                   "ok": accs["transfer"]["accuracy"] >= best_white,
                   "detail": f"transfer {100 * accs['transfer']['accuracy']:.1f}% vs strongest white-box "
                             f"{100 * best_white:.1f}%; {transfer_only} image(s) broken only by transfer"})
    if nattack_correct is not None:
        n = report["nattack"]["images"]
        white_n = white_worst[:n]
        black = nattack_correct[m_star]
        only_black = int((white_n & ~black).sum())
        best_white_n = min(float(v[:n].float().mean()) for k, v in white.items() if k != "clean") if n else 0.0
        checks.append({"check": "black-box (NAttack) is weaker than white-box", "kind": "masking",
                       "ok": float(black.float().mean()) >= best_white_n if n else True,
                       "detail": f"NAttack {100 * float(black.float().mean()):.1f}% vs strongest white-box "
                                 f"{100 * best_white_n:.1f}% on the same {n} images; {only_black} image(s) "
                                 f"survive every white-box attack but not NAttack"})
        worst_n = worst[:n] & black
    checks.append({"check": f"the paper's PGD-{args.steps} is within 5 points of the strongest attack",
                   "kind": "strength",
                   "ok": pgd_k - accs[strongest]["accuracy"] <= 0.05,
                   "detail": f"PGD-{args.steps} {100 * pgd_k:.1f}% vs {strongest} "
                             f"{100 * accs[strongest]['accuracy']:.1f}%"})
    return {
        "sigma": sigma, "samples": m_star, "images": n_strong, "accuracy": accs, "strongest": strongest,
        "pgd_k_overstates_by": pgd_k - accs[strongest]["accuracy"],
        "worst_case": accuracy_entry(worst), "clean": accuracy_entry(white["clean"]),
        **({"worst_case_with_nattack": accuracy_entry(worst_n)} if nattack_correct is not None else {}),
        "checks": checks,
    }


def report_for(checkpoint: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run every part of the report for one checkpoint and return it as one JSON-able dict."""
    t_start = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    timings: dict[str, float] = {}
    device = resolve_device(args.device, 0)
    model, manifest = load_checkpoint(checkpoint, device)
    spec = manifest.spec
    samples = sorted({int(m) for m in args.samples.split(",")})
    sigmas = floats(args.sigmas) if args.sigmas else default_sigmas(spec.smoothing.sigma)
    largest = max(args.test_images, args.strong_images, args.nattack_images, args.certify_images)
    test = load_split(args.data, "test", args.cache_dir).subset(largest, seed=args.seed)
    sizes = {k: min(getattr(args, k), len(test)) for k in ("test_images", "strong_images", "nattack_images",
                                                           "certify_images")}
    sizes["strong_images"] = min(sizes["strong_images"], sizes["test_images"])
    sizes["nattack_images"] = min(sizes["nattack_images"], sizes["strong_images"])
    x_all, y_all = to_float(test.images.to(device)), test.labels.to(device)

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = fn()
        timings[name] = time.perf_counter() - t0
        return value

    val, val_info = validation_set(manifest, args)
    validation = timed("validation", lambda: run_validation(model, manifest, val, sigmas, samples, args, device))
    sigma, m_star = validation["choice"]["sigma"], validation["choice"]["samples"]
    n = sizes["test_images"]
    grid, grid_correct = timed("grid", lambda: run_grid(model, manifest, x_all[:n], y_all[:n], sigmas, samples, args))
    k = sizes["strong_images"]
    strong = timed("strong", lambda: run_strong(model, manifest, x_all[:k], y_all[:k], sigma, m_star, samples, args))
    k = sizes["nattack_images"]
    black = timed("nattack", lambda: run_nattack(model, manifest, x_all[:k], y_all[:k], sigma, m_star, samples,
                                                 args)) if k else None
    test_cert = Dataset(test.images[: sizes["certify_images"]], test.labels[: sizes["certify_images"]],
                        test.classes, test.source, test.checksum, test.encoding)
    certify = timed("certify", lambda: run_certify(model, manifest, test_cert, sigmas, args, device))
    sequential = timed("sequential", lambda: run_sequential_part(
        smooth_at(model, manifest, sigma), x_all[:n], y_all[:n], max(samples), sizes["strong_images"], args)) \
        if args.sequential_confidence else None
    probe = x_all[:1]
    latency = timed("latency", lambda: [
        {"samples": m, "ms": latency_ms(smooth_at(model, manifest, sigma), probe, m, args.latency_repeats)}
        for m in tqdm(samples, desc="latency", unit="m", dynamic_ncols=True)])
    report: dict[str, Any] = {
        "model": manifest.name, "checkpoint": str(checkpoint), "weights_sha256": manifest.weights.sha256,
        "quick": args.quick, "command": command_line(args.argv),
        "smoothing": spec.smoothing.model_dump(), "noise_layers": spec.noise_layers.model_dump(),
        "architecture": spec.architecture.model_dump(), "training": training_summary(manifest),
        "data": {"source": test.source, "sha256": test.checksum, "encoding": test.encoding,
                 "subset_seed": args.seed, "noise_seed": args.seed, **sizes, "validation": val_info},
        "options": {k: v for k, v in vars(args).items() if k not in ("checkpoints", "argv")},
        "sigmas": sigmas, "samples": samples,
        "validation": validation, "grid": grid,
        "strong": {k: v for k, v in strong.items() if k != "correct"},
        "nattack": {k: v for k, v in black.items() if k != "correct"} if black else None,
        "certify": certify, "sequential": sequential, "latency_ms": latency,
        "machine": {"device": str(device), "platform": platform.platform(), "processor": platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "load_average_at_start": load_at_start},
    }
    report["findings"] = analyse(report, strong["correct"], grid_correct, black["correct"] if black else None,
                                 sigma, m_star, args)
    timings["total"] = time.perf_counter() - t_start
    report["timings_s"] = timings
    return report


def run_sequential_part(smooth: Smooth, x: torch.Tensor, y: torch.Tensor, budget: int, attacked: int,
                        args: argparse.Namespace) -> dict[str, Any]:
    """Sequential against fixed-budget answers on clean images and under the adaptive attack (the same
    function as ``siam evaluate --sequential``)."""
    attack = {"name": "adaptive", "norm": "Linf", "eps": args.eps, "step": args.step, "steps": args.steps,
              "soft_output_copies": args.adaptive_samples}
    torch.manual_seed(args.seed)
    with tqdm(total=len(y) + 2 * attacked, desc="sequential", unit="img", dynamic_ncols=True) as bar:
        results = run_sequential(smooth, x, y, budget, args.sequential_confidence, attack, attacked, 100, bar,
                                 stalling_images=attacked)
    return {"budget": budget, "confidence": args.sequential_confidence, "attack": attack, "results": results}


def training_summary(manifest: Manifest) -> dict[str, Any]:
    """The training facts a reader of the report needs (the rest is in the manifest)."""
    t = manifest.training
    config = t.get("config", {})
    keys = ("attack", "eps", "steps", "epochs", "sigma", "pni", "clean_weight", "beta", "train_images", "val_images")
    history = t.get("history") or [{}]
    return {"config": {k: config.get(k) for k in keys if k in config}, "epochs_completed": t.get("epochs_completed"),
            "complete": t.get("complete"), "train_images": t.get("data", {}).get("train_images"),
            "last_epoch": history[-1]}


def command_line(argv: list[str]) -> str:
    return "siam evaluate --report " + shlex.join(argv)


def default_checkpoints() -> list[Path]:
    """The shipped models: ``checkpoints/*/`` with a manifest, skipping hidden (scratch) folders."""
    return sorted(p.parent for p in Path("checkpoints").glob("*/manifest.json") if not p.parent.name.startswith("."))


def output_folder(root: Path, report: dict[str, Any]) -> Path:
    return root / report["model"] / ("quick" if report["quick"] else "")


def write_report(report: dict[str, Any], folder: Path) -> list[Path]:
    """``report.json``, the figures and ``report.md`` (which links the figures) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    figures = render_plots(report, folder)
    (folder / "report.md").write_text(render_markdown(report, [f.name for f in figures]))
    return [folder / "report.json", folder / "report.md", *figures]


def plan_line(checkpoints: list[Path], root: Path, quick: bool, named: bool) -> str:
    """What the run will do and roughly how long it takes, said before it starts: with no checkpoint named the
    report covers every shipped model, an hour or more on a CPU even with ``--quick``."""
    preset = "the quick preset: up to about 15 minutes" if quick else "the full preset: several hours"
    text = (f"robustness report for {len(checkpoints)} checkpoint(s) ({', '.join(c.name for c in checkpoints)}) "
            f"into {root}/; {preset} per width-1 ResNet-20 on 2 CPU cores, wider models longer")
    if not named and len(checkpoints) > 1:
        text += "; name checkpoints to report on fewer (siam evaluate --report --quick checkpoints/<name>)"
    return text


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = resolve(build_parser().parse_args(argv))
    args.argv = argv
    checkpoints = [Path(c) for c in args.checkpoints] or default_checkpoints()
    if not checkpoints:
        raise SystemExit("siam evaluate --report: no checkpoints given and none under checkpoints/")
    root = Path(args.output)
    if problem := unwritable(root):
        raise SystemExit(f"siam evaluate --report: cannot write the report to {root}: {problem}")
    print(plan_line(checkpoints, root, args.quick, named=bool(args.checkpoints)), flush=True)
    for i, checkpoint in enumerate(checkpoints, 1):
        print(f"[{i}/{len(checkpoints)}] {checkpoint}", flush=True)
        report = report_for(checkpoint, args)
        written = write_report(report, output_folder(root, report))
        print(f"{report['model']}: {report['timings_s']['total']:.0f} s; wrote " + ", ".join(map(str, written)))
    print(f"index: {write_index(root)}")


if __name__ == "__main__":
    main()
