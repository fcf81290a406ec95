"""The PNG: rows/s against samples for every system with the model's limit as a line, and latency
against clients, so a reader sees at a glance how far from the limit each system serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.report import CEILING

COLORS = {"siam": "tab:blue", "siam-torch": "tab:cyan", "siam-workers": "tab:brown", "fastapi": "tab:orange",
          "fastapi-onnx": "tab:red",
          "litserve": "tab:green", "engine": "tab:purple"}


def best_depth(cells: list[dict[str, Any]], system: str) -> dict[int, dict[str, Any]]:
    """For each samples value, the system's cell at the most clients measured."""
    out: dict[int, dict[str, Any]] = {}
    for c in cells:
        if c["system"] == system and (c["samples"] not in out or c["concurrency"] > out[c["samples"]]["concurrency"]):
            out[c["samples"]] = c
    return out


def plot_results(results: dict[str, Any], path: Path, latency_samples: int = 16) -> Path:
    cells = [c for c in results["http"]["cells"] if c["system"] != CEILING]  # no model: nothing to plot
    systems = list(dict.fromkeys(c["system"] for c in cells))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6.5))

    for b in results["limit"]["backends"]:
        if b["best_rows_per_s"]:
            style = "-" if b["backend"] == results["limit"]["best"]["backend"] else ":"
            left.axhline(b["best_rows_per_s"], color="black", linestyle=style, linewidth=1,
                         label=f"limit, {b['backend']} ({b['best_rows_per_s']:.0f} rows/s)")
    engine = results["engine"]["results"]
    if engine:
        left.plot([r["samples"] for r in engine], [r["rows_per_s"] for r in engine], "s--", color=COLORS["engine"],
                  label=f"engine alone ({results['engine']['concurrency']} callers)")
    for system in systems:
        deepest = best_depth(cells, system)
        ms = sorted(deepest)
        left.plot(ms, [deepest[m]["rows_per_s"] for m in ms], "o-", color=COLORS.get(system),
                  label=f"{system} over HTTP (most clients measured)")
        for m in ms:
            left.annotate(str(deepest[m]["concurrency"]), (m, deepest[m]["rows_per_s"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3), color=COLORS.get(system))
    left.set_xscale("log", base=2)
    all_ms = sorted({c["samples"] for c in cells} | {r["samples"] for r in engine})
    left.set_xticks(all_ms, [str(m) for m in all_ms])
    left.set_xlabel("samples m per prediction (annotation: clients)")
    left.set_ylabel("noisy rows / s")
    left.set_ylim(bottom=0)
    left.set_title("Throughput against the model's own limit")
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    left.grid(alpha=0.3)

    m = latency_samples if any(c["samples"] == latency_samples for c in cells) else cells[0]["samples"] if cells else 1
    for system in systems:
        mine = sorted((c for c in cells if c["system"] == system and c["samples"] == m and c["completed"]),
                      key=lambda c: c["concurrency"])
        if not mine:
            continue
        xs = [c["concurrency"] for c in mine]
        right.plot(xs, [c["p50_ms"] for c in mine], "o-", color=COLORS.get(system), label=f"{system} p50")
        right.plot(xs, [c["p99_ms"] for c in mine], "^:", color=COLORS.get(system), label=f"{system} p99")
    right.set_xscale("log", base=2)
    clients = sorted({c["concurrency"] for c in cells})
    right.set_xticks(clients, [str(c) for c in clients])
    right.set_yscale("log")
    right.set_xlabel("concurrent clients")
    right.set_ylabel("latency (ms)")
    right.set_title(f"Latency at samples={m}")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(systems))
    right.grid(alpha=0.3, which="both")

    machine = results["machine"]
    device = machine.get("gpu") or machine["device"]  # the GPU's name where there was one
    fig.suptitle(f"siam bench: {machine['cpu']}, {machine['cores']} cores, device {device}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
