"""Markdown, figures and the index of the robustness report, all drawn from the report's JSON dict only
(so every number in the text comes from the run that wrote it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.sequential_eval import plot as plot_copies_used
from training.sequential_eval import table as sequential_table

PAPER_PGD = 0.604
"""Nemcovsky et al. (2019), abstract: 60.4% under PGD, CIFAR-10, ResNet-20 (official lossless images)."""
PNI_CLEAN, PNI_PGD = 0.849, 0.459
"""He, Rakin & Fan (2019), PNI-W ResNet-20 on CIFAR-10: clean 84.9%, PGD 45.9%."""

ATTACK_NOTES = {
    "clean": "no attack",
    "pgd": "the paper's PGD-k: L-inf, random start, gradient from one noise draw per step",
    "eot": "EOT-PGD-k: each step's gradient averaged over that many noise draws",
    "adaptive": "PGD-k on the log of the smoothed soft output (mean softmax of that many copies; Salman et al.)",
    "strong": "EOT-PGD with more steps and random restarts (the restart with the highest loss is kept)",
    "transfer": "PGD on the noise-free base model (no input noise, PNI off), then fed to the smoothed model",
    "apgd": "AutoAttack's APGD on that loss (cross-entropy or DLR), that many steps and noise draws per gradient",
    "worst-case": "per image: right only if right under every attack in the table (and clean)",
}


def pct(entry: dict[str, Any]) -> str:
    """``12.3% [10.1, 14.8]``."""
    return f"{100 * entry['accuracy']:.1f}% [{100 * entry['ci95'][0]:.1f}, {100 * entry['ci95'][1]:.1f}]"


def note(name: str) -> str:
    for key in ("adaptive", "transfer", "worst-case", "clean", "apgd"):
        if name.startswith(key):
            return ATTACK_NOTES[key]
    if "-r" in name:
        return ATTACK_NOTES["strong"]
    return ATTACK_NOTES["eot" if name.startswith("eot") else "pgd"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _setup(r: dict[str, Any]) -> list[str]:
    d, t, o, sm = r["data"], r["training"], r["options"], r["smoothing"]
    val = d["validation"]
    seen = {"no": "held out of training (recorded in the checkpoint), never seen by the model",
            "yes": "**seen in training** (the checkpoint recorded no held-out split; train with `--val-images` "
                   "to fix this)",
            "possibly": "possibly seen in training (the checkpoint records other training data or a subset)"}
    cfg = ", ".join(f"{k}={v}" for k, v in t["config"].items())
    trained = (f"{cfg}; {t['epochs_completed']} epoch(s) completed, {t['train_images']} training images"
               if t["config"] else "not recorded in the checkpoint")
    return [
        "## Setup", "",
        *_table(["", ""], [
            ["model", f"`{r['model']}` ({r['architecture']['name']}, width {r['architecture']['width']}), weights "
                      f"sha256 `{r['weights_sha256'][:16]}…`"],
            ["training", trained],
            ["smoothing", f"sigma {sm['sigma']:g} ({sm['space']} space), default m {sm['default_samples']}, "
                          f"aggregation {sm['aggregation']}; PNI: {r['noise_layers']['type']}"],
            ["test data", f"`{d['source']}` ({d['encoding']} encoding, sha256 `{d['sha256'][:16]}…`), CIFAR-10 test "
                          f"split; a fixed random permutation with seed {d['subset_seed']}"],
            ["images", f"grid {d['test_images']}; stronger attacks and eps sweep: the first {d['strong_images']} "
                       f"of them; NAttack: the first {d['nattack_images']}; CERTIFY: the first {d['certify_images']}"],
            ["validation", f"{val['images']} images of the train split (choice seed {val['seed']}), "
                           f"{seen[val['seen_in_training']]}"],
            ["seeds", f"noise and attack randomness: torch.manual_seed({o['seed']} + section), sections "
                      "validation 1, grid 2, strong 3, NAttack 4, CERTIFY 5; NAttack generator seed "
                      f"{o['seed']}"],
            ["machine", f"{r['machine']['device']}, {r['machine']['platform']}, {r['machine']['threads']} torch "
                        f"thread(s) of {r['machine']['cpu_count']} CPUs, load average "
                        f"{r['machine']['load_average_at_start']:.1f} at the start (other work shares the machine "
                        f"when it is above 0), torch {r['machine']['torch']}"],
            ["run time", ", ".join(f"{k} {v / 60:.1f} min" for k, v in r["timings_s"].items())],
        ]), ""]


def _summary(r: dict[str, Any]) -> list[str]:
    f, c = r["findings"], r["validation"]["choice"]
    acc = f["accuracy"]
    lines = ["## Summary", "",
             f"- **Operating point chosen on validation images**: sigma = {c['sigma']:g}, m = {c['samples']} "
             f"({c['rule']}).",
             f"- **At that point, on {f['images']} test images**: clean {pct(f['clean'])}; the paper's "
             f"PGD-{r['options']['steps']} {pct(acc['pgd' + str(r['options']['steps'])])}; strongest single attack "
             f"`{f['strongest']}` {pct(acc[f['strongest']])}; **per-image worst case over all {len(acc)} attacks "
             f"{pct(f['worst_case'])}**."]
    if "worst_case_with_nattack" in f:
        lines.append(f"- Worst case including NAttack (first {r['nattack']['images']} images): "
                     f"{pct(f['worst_case_with_nattack'])}.")
    lines.append("- Checks: " + "; ".join(f"✅ {ch['check']}" if ch["ok"] else f"⚠️ {ch['check']}: no ({ch['detail']})"
                                         for ch in f["checks"]) + ".")
    return [*lines, ""]


def _validation(r: dict[str, Any]) -> list[str]:
    v = r["validation"]
    samples = r["samples"]
    rows = []
    for sigma in r["sigmas"]:
        cells = [f"{s['robust']['accuracy'] * 100:.1f} / {s['clean']['accuracy'] * 100:.1f}"
                 for m in samples for s in v["rows"] if s["sigma"] == sigma and s["samples"] == m]
        rows.append([f"{sigma:g}", *cells])
    return ["## 1. Choosing sigma and m on validation images", "",
            f"Robust / clean accuracy (%) on {r['data']['validation']['images']} validation images; robust = right "
            f"both clean and under `{v['attack']}` (per image). Chosen: **sigma {v['choice']['sigma']:g}, m "
            f"{v['choice']['samples']}**. The test set below is used for reporting only.", "",
            *_table(["sigma", *(f"m={m}" for m in samples)], rows), ""]


def _grid(r: dict[str, Any]) -> list[str]:
    samples = r["samples"]
    attacks = list(dict.fromkeys(g["attack"] for g in r["grid"]))
    rows = []
    for sigma in r["sigmas"]:
        for attack in attacks:
            cells = [pct(g) for m in samples for g in r["grid"]
                     if g["sigma"] == sigma and g["attack"] == attack and g["samples"] == m]
            rows.append([f"{sigma:g}", f"`{attack}`", *cells])
    latency = {p["samples"]: p["ms"] for p in r["latency_ms"]}
    rows.append(["", "**latency, one image (ms)**", *(f"{latency[m]:.1f}" for m in samples)])
    o = r["options"]
    return ["## 2. Accuracy against m and sigma: the latency/robustness knob", "",
            f"{r['data']['test_images']} test images, L-inf eps {255 * o['eps']:g}/255, step {255 * o['step']:g}/255, "
            f"{o['steps']} steps. The answer at m aggregates the first m of the same {max(samples)} noisy copies "
            f"(each is an honest m-copy answer). Latency: median of {o['latency_repeats']} predictions of one "
            f"image with `Smooth.predict_batch`, measured by this command on this machine "
            f"({r['machine']['device']}, {r['machine']['threads']} thread(s)); compare latencies only within one "
            "report.", "",
            *_table(["sigma", "attack", *(f"m={m}" for m in samples)], rows), "",
            "Attacks: " + "; ".join(f"`{a}`: {note(a)}" for a in attacks) + ".", "",
            "![accuracy and latency against m](tradeoff.png)", ""]


def _strong(r: dict[str, Any]) -> list[str]:
    s, f = r["strong"], r["findings"]
    m_star, samples = f["samples"], r["samples"]
    show = sorted({samples[0], m_star, samples[-1]})
    rows = [[f"`{name}`", *(pct(next(x for x in s["rows"] if x["attack"] == name and x["samples"] == m))
                            for m in show), note(name)]
            for name in dict.fromkeys(x["attack"] for x in s["rows"])]
    o = r["options"]
    return [f"## 3. Stronger attacks at sigma = {s['sigma']:g}", "",
            f"The first {s['images']} test images. 50-step attack: step {255 * o['strong_step']:g}/255, "
            f"{o['strong_eot']} draws per gradient, {o['restarts']} restarts; transfer: {o['transfer_steps']} "
            f"steps of {255 * o['strong_step']:g}/255 on the surrogate.", "",
            *_table(["attack", *(f"m={m}" for m in show), "what it is"], rows), "",
            f"At m = {m_star} on these images, all attacks together (grid attacks included):", "",
            *_table(["attack", "accuracy"], [[f"`{k}`", pct(v)] for k, v in
                                             sorted(f["accuracy"].items(), key=lambda kv: kv[1]["accuracy"])]
                    + [["**worst case**", pct(f["worst_case"])]]), ""]


def _sweep(r: dict[str, Any]) -> list[str]:
    sw = r["strong"]["eps_sweep"]
    rows = [[f"{255 * x['eps']:g}/255", pct(x)] for x in sw["rows"]]
    verdict = ("✅ accuracy falls with eps and reaches ~0% at the largest eps." if not sw["problems"]
               else "⚠️ " + "; ".join(sw["problems"]) + ".")
    return ["## 4. Eps sweep", "",
            f"`{sw['attack']}` at sigma {r['strong']['sigma']:g}, judged with m = {sw['samples']}, first "
            f"{r['strong']['images']} test images. An honest evaluation must drive accuracy towards 0% as eps grows; "
            "a plateau is a classic sign of gradient masking.", "",
            *_table(["eps", "accuracy"], rows), "", verdict, "", "![accuracy against eps](eps_sweep.png)", ""]


def _nattack(r: dict[str, Any]) -> list[str]:
    b = r["nattack"]
    if not b:
        return []
    rows = [[f"m={x['samples']}", pct(x)] for x in b["rows"]]
    return ["## 5. NAttack (query-only black box)", "",
            f"Li et al. (2019), untargeted L-inf eps {255 * r['options']['eps']:g}/255, on the first {b['images']} "
            f"test images at sigma {b['sigma']:g}. It queries only the smoothed classifier's output probabilities "
            f"with m = {b['queried_samples']} copies per query: population {b['population']}, search sigma "
            f"{r['options']['nattack_sigma']}, learning rate {r['options']['nattack_lr']}, done once another class "
            f"leads by {r['options']['nattack_kappa']:g} in log-probability, at most {b['max_queries']} "
            f"queries per image (mean spent {b['mean_queries']:.0f}). The attack's own check fooled "
            f"{b['attacker_success']}/{b['images']} images; the adversarial images (max |delta| "
            f"{255 * b['max_linf']:.2f}/255) are then judged with fresh noise:", "",
            *_table(["m", "accuracy"], rows), ""]


def _certify(r: dict[str, Any]) -> list[str]:
    if not r["certify"]:
        return ["## 6. Certified accuracy", "", "No sigma > 0 to certify.", ""]
    radii = [x["radius"] for x in r["certify"][0]["rows"]]
    rows = [[f"{c['sigma']:g}", *(pct(x) for x in c["rows"]), f"{c['abstained']}/{c['images']}",
             f"{c['max_radius']:.3f}"] for c in r["certify"]]
    c0 = r["certify"][0]
    return ["## 6. Certified accuracy (Cohen et al.'s CERTIFY)", "",
            f"First {c0['images']} test images, n0 = {c0['n0']}, n = {c0['n']}, alpha = {c0['alpha']}; certified "
            "accuracy at L2 radius r (pixel space, images in [0, 1]) = share of images whose certified label is "
            "right with radius >= r. The certificate covers the smoothed *vote* classifier; the served default "
            f"aggregation is `{r['smoothing']['aggregation']}`.", "",
            *_table(["sigma", *(f"r={x:g}" for x in radii), "abstained", "largest certifiable r"], rows), "",
            "The largest certifiable radius with n copies is sigma * Phi^-1(alpha^(1/n)), reached when every copy "
            "votes for the label; beyond it the table reads 0% by construction, not because of an attack.", "",
            "![certified accuracy](certified.png)", ""]


def _sequential(r: dict[str, Any]) -> list[str]:
    q = r.get("sequential")
    if not q:
        return []
    a = q["attack"]
    return ["## 7. Sequential sampling (`?confidence=`)", "",
            f"Each image answered twice at sigma = {r['findings']['sigma']:g}: sequentially (rounds of 16 copies, "
            f"doubling, up to a budget of {q['budget']}, stopping once a binomial test at confidence "
            f"{q['confidence']} spread over the rounds says the top class beats the runner-up) and with the whole "
            f"budget. Attacked images: adaptive PGD-{a['steps']} (L-inf {a['eps'] * 255:.0f}/255, step "
            f"{a['step'] * 255:.0f}/255, random start) on the log of the mean softmax of "
            f"{a['soft_output_copies']} noisy copies, the quantity the sequential vote estimates. Stalling: the "
            "same PGD aimed at the stopping rule, maximising minus the gap between the top two classes of the "
            "mean softmax so that the vote stays close and every copy of the budget is spent (a cost attack: "
            "the budget bounds what it can take).", "",
            *sequential_table(q["results"]), "",
            "![copies used](sequential.png)", ""]


def _discussion(r: dict[str, Any]) -> list[str]:
    f, o = r["findings"], r["options"]
    acc = f["accuracy"]
    pgd_k = acc[f"pgd{o['steps']}"]
    failed = [c for c in f["checks"] if not c["ok"] and c.get("kind") == "masking"]
    weak = [c for c in f["checks"] if not c["ok"] and c.get("kind") != "masking"]
    lines = ["## 8. Discussion", "",
             f"**Strongest attack.** At sigma {f['sigma']:g}, m {f['samples']}, the strongest single attack is "
             f"`{f['strongest']}` ({pct(acc[f['strongest']])}); the per-image worst case over all attacks is "
             f"{pct(f['worst_case'])}. The paper's own PGD-{o['steps']} (one noise draw per gradient) gives "
             f"{pct(pgd_k)}, i.e. it overstates robustness by {100 * f['pgd_k_overstates_by']:.1f} points here.", ""]
    if failed:
        lines += ["**Signs of gradient masking.** " + " ".join(f"⚠️ {c['check']} fails: {c['detail']}." for c in failed)
                  + " Treat the white-box numbers as upper bounds.", ""]
    else:
        lines += ["**Signs of gradient masking.** None in these checks: "
                  + "; ".join(c["detail"] for c in f["checks"] if c.get("kind") == "masking") + ".", ""]
    if weak:
        lines += ["**Attack strength.** " + " ".join(f"⚠️ {c['check']}: no ({c['detail']})." for c in weak), ""]
    worst = f["worst_case"]["accuracy"]
    clean = f["clean"]["accuracy"]
    encoding = (f"these figures are on the {r['data']['encoding']} encoding"
                + (", which costs a standard ResNet-20 about 10 points of clean accuracy against the official images"
                   if r["data"]["encoding"] == "JPEG" else ""))
    cfg = r["training"]["config"]
    recipe = (f"{cfg.get('attack')} adversarial training at sigma {cfg.get('sigma')}, "
              f"{r['training']['epochs_completed']} epoch(s)" if cfg else "not recorded")
    lines += [f"**Against the published numbers.** Nemcovsky et al. report {100 * PAPER_PGD:.1f}% under PGD for a "
              f"smoothed ResNet-20 on CIFAR-10, and PNI (He et al., 2019) {100 * PNI_CLEAN:.1f}% clean / "
              f"{100 * PNI_PGD:.1f}% PGD. Here the same kind of attack (PGD-{o['steps']}) gives "
              f"{100 * pgd_k['accuracy']:.1f}% ({100 * (pgd_k['accuracy'] - PAPER_PGD):+.1f} points against the "
              f"paper, {100 * (pgd_k['accuracy'] - PNI_PGD):+.1f} against PNI) with {100 * clean:.1f}% clean "
              f"({100 * (clean - PNI_CLEAN):+.1f} against PNI), and {100 * worst:.1f}% under the worst case. "
              f"Differences come from the data ({encoding}), the training recipe ({recipe}), and the adaptive "
              "attacks, which the published numbers did not face.", ""]
    lat = {p["samples"]: p["ms"] for p in r["latency_ms"]}
    curve = {g["samples"]: g for g in r["grid"] if g["sigma"] == f["sigma"] and g["attack"] == "worst-case"}
    m0, m1 = min(curve), max(curve)
    lines += [f"**The m knob.** At sigma {f['sigma']:g} the grid's worst case goes from {pct(curve[m0])} at m={m0} "
              f"({lat[m0]:.1f} ms) to {pct(curve[m1])} at m={m1} ({lat[m1]:.1f} ms); the chosen m={f['samples']} "
              f"costs {lat[f['samples']]:.1f} ms per image on this machine.", ""]
    if r["certify"]:
        best = max(r["certify"], key=lambda c: c["rows"][0]["accuracy"])
        linf_as_l2 = o["eps"] * (3 * 32 * 32) ** 0.5
        lines += [f"**Certificates.** At sigma {best['sigma']:g} CERTIFY gives "
                  + ", ".join(f"{pct(x)} at r={x['radius']:g}" for x in best["rows"])
                  + f". An L-inf ball of {255 * o['eps']:g}/255 reaches L2 distance {linf_as_l2:.2f}, far beyond these "
                  "radii, so the certificates do not cover the L-inf attacks above: those numbers are empirical.", ""]
    if r["quick"]:
        lines += ["**This is the quick subset.** The image counts are small and the intervals wide; NAttack runs "
                  "with a small budget and few copies per query, so it is a weak black box here. Use the full report "
                  "for decisions.", ""]
    return lines


def render_markdown(r: dict[str, Any], figures: list[str]) -> str:
    """The whole report as Markdown."""
    title = f"# Robustness report: `{r['model']}`" + (" (quick subset)" if r["quick"] else "")
    intro = [title, "",
             f"Generated by `{r['command']}` in {r['timings_s']['total'] / 60:.1f} min. Every number and figure here "
             "comes from that run (`report.json` holds them all); accuracies are on the CIFAR-10 test split "
             f"({r['data']['encoding']} encoding) with 95% Clopper-Pearson intervals, written `acc [low, high]`.", ""]
    body = [*_summary(r), *_setup(r), *_validation(r), *_grid(r), *_strong(r), *_sweep(r), *_nattack(r),
            *_certify(r), *_sequential(r), *_discussion(r)]
    text = "\n".join(intro + body)
    for name in ("tradeoff.png", "eps_sweep.png", "certified.png", "sequential.png"):
        if name not in figures:
            text = "\n".join(line for line in text.split("\n") if f"]({name})" not in line)
    return text + "\n"


def render_plots(r: dict[str, Any], folder: Path) -> list[Path]:
    """``tradeoff.png``, ``eps_sweep.png``, ``certified.png`` (with certificates) and ``sequential.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    f = r["findings"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5.5))
    for attack in dict.fromkeys(g["attack"] for g in r["grid"]):
        pts = sorted(((g["samples"], g) for g in r["grid"] if g["sigma"] == f["sigma"] and g["attack"] == attack),
                     key=lambda p: p[0])
        bars = attack in ("clean", "worst-case")  # intervals of the others overlap these; see the table
        ax.errorbar([p[0] for p in pts], [100 * p[1]["accuracy"] for p in pts],
                    yerr=[[100 * (p[1]["accuracy"] - p[1]["ci95"][0]) for p in pts],
                          [100 * (p[1]["ci95"][1] - p[1]["accuracy"]) for p in pts]],
                    marker="o", capsize=2 if bars else 0, label=attack, lw=2.5 if attack == "worst-case" else 1.2,
                    elinewidth=1 if bars else 0)
    lat = ax.twinx()
    lat.plot([p["samples"] for p in r["latency_ms"]], [p["ms"] for p in r["latency_ms"]], "k--", label="latency")
    lat.set_ylabel("latency of one prediction (ms, dashed)")
    ax.set_title(f"sigma = {f['sigma']:g} (chosen on validation)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    for sigma in r["sigmas"]:
        for attack, style in (("clean", ":"), ("worst-case", "-")):
            pts = sorted((g["samples"], g["accuracy"]) for g in r["grid"]
                         if g["sigma"] == sigma and g["attack"] == attack)
            ax2.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, marker="o", label=f"{attack}, σ={sigma:g}")
    ax2.set_title("clean (dotted) and worst-case (solid) per sigma", fontsize=10)
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    ax2.set_ylim(0, 100)
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xticks(r["samples"], [str(m) for m in r["samples"]])
        a.set_xlabel("m (noisy copies per prediction)")
        a.set_ylabel("accuracy (%)")
        a.grid(alpha=0.3)
    fig.suptitle(f"{r['model']}: accuracy vs m, {r['data']['test_images']} test images ({r['data']['encoding']})",
                 fontsize=11)
    fig.tight_layout()
    out.append(folder / "tradeoff.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)

    sw = r["strong"]["eps_sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [255 * x["eps"] for x in sw["rows"]]
    ax.errorbar(xs, [100 * x["accuracy"] for x in sw["rows"]],
                yerr=[[100 * (x["accuracy"] - x["ci95"][0]) for x in sw["rows"]],
                      [100 * (x["ci95"][1] - x["accuracy"]) for x in sw["rows"]]], marker="o", capsize=3)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel("L-inf eps (x/255)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(f"eps sweep: {sw['attack']}, σ={r['strong']['sigma']:g}, m={sw['samples']}", fontsize=9)
    fig.tight_layout()
    out.append(folder / "eps_sweep.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)

    if r["certify"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in r["certify"]:
            ax.plot([x["radius"] for x in c["rows"]], [100 * x["accuracy"] for x in c["rows"]], marker="o",
                    label=f"σ={c['sigma']:g}")
        ax.set_xlabel("L2 radius (pixel space)")
        ax.set_ylabel("certified accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"CERTIFY, n={r['certify'][0]['n']}, {r['certify'][0]['images']} images", fontsize=10)
        fig.tight_layout()
        out.append(folder / "certified.png")
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)
    if r.get("sequential"):
        out.append(folder / "sequential.png")
        plot_copies_used({**r["sequential"], "model": r["model"]}, out[-1])
    return out


def write_index(root: Path) -> Path:
    """``<root>/README.md``: one line per report found under ``root``."""
    rows = []
    for path in sorted(root.glob("*/report.json")) + sorted(root.glob("*/quick/report.json")):
        r = json.loads(path.read_text())
        f = r["findings"]
        rows.append([f"[{r['model']}{' (quick)' if r['quick'] else ''}]({path.parent.relative_to(root)}/report.md)",
                     f"{f['sigma']:g}", str(f["samples"]), pct(f["clean"]), pct(f["worst_case"]), f"`{f['strongest']}`",
                     str(f["images"])])
    lines = ["# Robustness reports", "",
             "Regenerate with `siam evaluate --report` (full; hours on a CPU) or `siam evaluate --report --quick` "
             "(under 15 minutes on 2 CPU cores); see `siam evaluate --report --help`. Sigma and m are chosen on "
             "validation images; accuracies are on the CIFAR-10 test split with 95% Clopper-Pearson intervals.", "",
             *_table(["report", "sigma", "m", "clean", "worst case", "strongest attack", "images"], rows), ""]
    path = root / "README.md"
    path.write_text("\n".join(lines))
    return path
