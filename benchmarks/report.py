"""Ratios, targets and the printed table, all computed from the measured numbers in a results dict.

Every rate is divided by the limit measured in the same run (``limit.reference_rows_per_s``) and by the
baselines' rate in the same cell (same samples, same clients, measured back to back), so a slower or
busier machine moves the numerator and the denominator together.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, TypeVar

Results = dict[str, Any]
T = TypeVar("T")

BASELINES = ("fastapi", "fastapi-onnx", "litserve")
PLAIN = ("fastapi", "fastapi-onnx")  # one request, one forward: the plain classifier services
SERVICE = "siam"
CEILING = "instant"  # the load generator's ceiling (benchmarks/baselines/instant_server.py), not a system under test


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def cell_index(cells: list[dict[str, Any]]) -> dict[tuple[int, int, str], dict[str, Any]]:
    return {(c["samples"], c["concurrency"], c["system"]): c for c in cells}


def in_turn(items: Sequence[T], round_: int) -> list[T]:
    """``items`` in the order of round ``round_`` (from 0), the first place rotating from round to round.

    Whatever is measured first after a server start or a pause was seen to come out 5-15% behind the one
    after it (``docs/speed.md``); rotating gives every item every place equally often when the rounds are a
    multiple of the items."""
    shift = round_ % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


MEDIAN_FIELDS = ("predictions_per_s", "rows_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms")


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell from repeated runs of it on one system: the median of each rate and percentile, the
    per-run values under ``runs`` and their min and max under ``spread``. Counts (completed, errors) add
    up, so an error in any run shows. A single run is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    cell = dict(runs[0])
    for name in MEDIAN_FIELDS:
        values = [r[name] for r in runs]
        cell[name] = statistics.median(values)
        cell.setdefault("spread", {})[name] = [min(values), max(values)]
    cell["completed"] = sum(r["completed"] for r in runs)
    cell["errors"] = sum(r["errors"] for r in runs)
    cell["first_error"] = next((r["first_error"] for r in runs if r["first_error"]), None)
    if all(r.get("mean_samples_used") is not None for r in runs):
        cell["mean_samples_used"] = statistics.median(r["mean_samples_used"] for r in runs)
    cell["runs"] = [{name: r[name] for name in ("rows_per_s", "p50_ms", "p99_ms")} for r in runs]
    return cell


def add_ratios(results: Results) -> None:
    """Fill ``ratio_to_limit`` and ``vs_<baseline>`` into every engine and HTTP row."""
    limit = results["limit"]["reference_rows_per_s"]
    for entry in results["limit"]["backends"]:
        entry["ratio_to_limit"] = ratio(entry["best_rows_per_s"], limit)
    bare = results["limit"].get("bare_rows_per_s")
    cells = results["http"]["cells"]
    index = cell_index(cells)
    for cell in cells:
        if cell["system"] == CEILING:  # no model behind it: rows and baselines mean nothing
            continue
        cell["ratio_to_limit"] = ratio(cell["rows_per_s"], limit)
        cell["ratio_to_bare"] = ratio(cell["rows_per_s"], bare)
        for base in BASELINES:
            other = index.get((cell["samples"], cell["concurrency"], base))
            cell[f"vs_{base}"] = ratio(cell["rows_per_s"], other["rows_per_s"] if other else None)
        if cell.get("confidence") is not None:  # sequential: predictions/s against the fixed budget's
            fixed = index.get((cell["samples"], cell["concurrency"], cell["system"].split(" ")[0]))
            cell["vs_fixed"] = ratio(cell["predictions_per_s"], fixed["predictions_per_s"] if fixed else None)
    engine = results["engine"]
    for row in engine["results"]:
        row["ratio_to_limit"] = ratio(row["rows_per_s"], limit)
        for base in BASELINES:  # the baselines over HTTP at the same m and depth: what the engine has to spare
            other = index.get((row["samples"], row["concurrency"], base))
            row[f"vs_{base}"] = ratio(row["rows_per_s"], other["rows_per_s"] if other else None)


def target(name: str, value: float | None, threshold: float, higher_is_better: bool, detail: str) -> dict[str, Any]:
    goal = ">=" if higher_is_better else "<="
    if value is None:
        return {"target": name, "value": None, "goal": goal, "threshold": threshold, "met": None,
                "detail": "not measured in this run: " + detail}
    met = value >= threshold if higher_is_better else value <= threshold
    return {"target": name, "value": value, "goal": goal, "threshold": threshold, "met": met, "detail": detail}


def evaluate_targets(results: Results, m: int = 16, clients: int = 64) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value, the threshold and whether it is met."""
    index = cell_index(results["http"]["cells"])
    limit = results["limit"]["reference_rows_per_s"]
    engine = {r["samples"]: r for r in results["engine"]["results"]}
    out = [target(f"engine rows/s at samples={m} / limit", engine[m]["ratio_to_limit"] if m in engine else None,
                  0.90, True, f"engine alone, {results['engine']['concurrency']} callers")]
    busy = index.get((m, clients, SERVICE))
    out.append(target(f"HTTP rows/s, {clients} clients, samples={m} / limit",
                      busy["ratio_to_limit"] if busy else None, 0.75, True, "load generator in its own process"))
    out.append(target(f"HTTP rows/s, {clients} clients, samples={m} / bare forward (no noise)",
                      busy.get("ratio_to_bare") if busy else None, 0.85, True,
                      "issue 14: the noise is part of the service's cost, so the bare network is the ceiling"))
    out.append(target(f"HTTP rows/s, {clients} clients, samples={m} / LitServe",
                      busy.get("vs_litserve") if busy else None, 1.5, True, "same cell, measured back to back"))
    single = index.get((m, 1, SERVICE))
    p99_ratio = ratio(busy["p99_ms"], single["p50_ms"]) if busy and single else None
    floor = clients * m / limit * 1000 if limit else None
    floor_note = (f"p99 / single-request p50 (1 client); any server is bounded below by the time the limit "
                  f"needs for every client's copies, {clients}x{m}/{limit:.0f} rows/s = {floor:.0f} ms"
                  if floor else "p99 / single-request p50 (1 client)")
    out.append(target(f"HTTP p99, {clients} clients, samples={m} / single-request latency", p99_ratio, 4.0, False,
                      floor_note))
    out.append(m1_overhead(results))
    sequential = [c for c in results["http"]["cells"]
                  if c.get("confidence") is not None and c["system"].startswith(SERVICE + " ")]
    if sequential:  # the largest budget at the most clients measured (issue 13: 256 and 64)
        top = max(sequential, key=lambda c: (c["samples"], c["concurrency"]))
        out.append(target(f"sequential pred/s at budget {top['samples']}, {top['concurrency']} clients "
                          f"/ fixed {top['samples']}",
                          top.get("vs_fixed"), 3.0, True,
                          f"confidence {top['confidence']:g}, {top['mean_samples_used']:.1f} copies per image "
                          "on real test images, same run"))
    out.append(default_backend(results))
    out.append(load_headroom(results))
    return out


def load_headroom(results: Results) -> dict[str, Any]:
    """How far the load generator's ceiling (its rate against an instant server) is above the fastest
    system measured at the same client count, at the worst client count: near 1, the load generator and
    not the system set that rate."""
    cells = results["http"]["cells"]
    ceilings = {c["concurrency"]: c["predictions_per_s"] for c in cells if c["system"] == CEILING}
    worst, where = None, ""
    for clients, ceiling in ceilings.items():
        rates = [c["predictions_per_s"] for c in cells if c["concurrency"] == clients and c["system"] != CEILING]
        if rates and max(rates):
            value = ceiling / max(rates)
            if worst is None or value < worst:
                worst, where = value, f"{clients} clients: {ceiling:.0f} pred/s against {max(rates):.0f}"
    return target("load generator's ceiling / fastest system's pred/s (worst client count)", worst, 2.0, True,
                  where or "needs the instant system")


def m1_overhead(results: Results) -> dict[str, Any]:
    """Smoothing machinery at m = 1 against the best plain one-forward-per-request service (PyTorch or the
    same ONNX graph): the worst of the throughput loss at every client count and the latency added at one
    client."""
    index = cell_index(results["http"]["cells"])
    worst, where = None, ""
    for (m, clients, system), cell in index.items():
        plains = [index[(m, clients, p)] for p in PLAIN if (m, clients, p) in index]
        if m != 1 or system != SERVICE or not plains or not cell["predictions_per_s"]:
            continue
        fastest = max(plains, key=lambda c: c["predictions_per_s"])
        overheads = {f"throughput at {clients} clients vs {fastest['system']}":
                     fastest["predictions_per_s"] / cell["predictions_per_s"] - 1}
        if clients == 1:
            quickest = min((p for p in plains if p["p50_ms"]), key=lambda c: c["p50_ms"], default=None)
            if quickest:
                overheads[f"p50 latency at 1 client vs {quickest['system']}"] = cell["p50_ms"] / quickest["p50_ms"] - 1
        for label, value in overheads.items():
            if worst is None or value > worst:
                worst, where = value, label
    return target("samples=1 overhead vs the best plain FastAPI service (worst case)", worst, 0.10, False,
                  f"worst: {where}" if where else "needs samples=1 cells for siam and fastapi")


def default_backend(results: Results) -> dict[str, Any]:
    """Whether the backend the service picked by default is the fastest one measured here."""
    runtime = results["http"]["systems"].get(SERVICE, {}).get("runtime", {})
    chosen = runtime.get("backend") or results["engine"].get("backend")
    fastest = results["limit"]["best"]["backend"]
    rates = {b["backend"]: b["best_rows_per_s"] for b in results["limit"]["backends"] if b["best_rows_per_s"]}
    if chosen == "onnx" and runtime.get("ort_threads") in ("per-chunk", "auto") and "onnx-per-chunk" in rates:
        chosen = "onnx-per-chunk"  # how that service runs every batch of two rows or more
    value = ratio(rates.get(chosen), rates.get(fastest))
    detail = f"service chose {chosen}; fastest limit here: {fastest} (" + ", ".join(
        f"{k} {v:.0f} rows/s" for k, v in rates.items()) + ")"
    return target("default backend's limit / fastest backend's limit", value, 1.0, True, detail)


# --- the printed table -------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


HEADER = ("what", "samples", "clients", "pred/s", "rows/s", "rows/s min-max", "% limit", "p50 ms", "p50 min-max",
          "p99 ms", *(f"vs {b}" for b in BASELINES))


def span(cell: dict[str, Any], name: str, spec: str) -> str:
    """``min-max`` of a median over repeated runs, "-" for a single run."""
    low_high = cell.get("spread", {}).get(name)
    return "-" if low_high is None else f"{low_high[0]:{spec}}-{low_high[1]:{spec}}"


def table_rows(results: Results) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for b in results["limit"]["backends"]:
        what = f"limit {b['backend']} (chunk {b['best_chunk']})" if not b.get("error") else f"limit {b['backend']}"
        rows.append((what, "-", "-", "-", fmt(b["best_rows_per_s"]), "-", pct(b.get("ratio_to_limit")), "-", "-", "-",
                     *("-" for _ in BASELINES)))
    eng = results["engine"]
    for r in eng["results"]:
        rows.append((f"engine {eng['backend']}", str(r["samples"]), str(r["concurrency"]), fmt(r["predictions_per_s"]),
                     fmt(r["rows_per_s"]), "-", pct(r["ratio_to_limit"]), fmt(r["p50_ms"], ".1f"), "-",
                     fmt(r["p99_ms"], ".1f"), *(times(r.get(f"vs_{b}")) for b in BASELINES)))
    for c in results["http"]["cells"]:
        what = f"http {c['system']}" + (" (load generator's ceiling)" if c["system"] == CEILING else "")
        if c.get("mean_samples_used") is not None:
            what += f" ({c['mean_samples_used']:.1f} copies, {times(c.get('vs_fixed'))} fixed pred/s)"
        rows.append((what, str(c["samples"]), str(c["concurrency"]), fmt(c["predictions_per_s"]),
                     fmt(c["rows_per_s"]), span(c, "rows_per_s", ".0f"), pct(c.get("ratio_to_limit")),
                     fmt(c["p50_ms"], ".1f"), span(c, "p50_ms", ".1f"), fmt(c["p99_ms"], ".1f"),
                     *(times(c.get(f"vs_{b}")) for b in BASELINES)))
    return rows


def render_table(rows: list[tuple[str, ...]], header: tuple[str, ...] = HEADER, markdown: bool = False) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))
    out = [line, "-" * len(line)]
    out += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows]
    return "\n".join(out)


def render_targets(targets: list[dict[str, Any]], markdown: bool = False) -> str:
    lines = []
    for t in targets:
        mark = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        line = f"{mark:6} {t['target']}: {value} (target {t['goal']} {t['threshold']:g}); {t['detail']}"
        lines.append(f"- {line}" if markdown else line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.report RESULTS.json [--markdown]``: the table and targets of a saved run."""
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    p.add_argument("results", type=Path)
    p.add_argument("--markdown", action="store_true", help="as a Markdown table (for the README)")
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text())
    print(render_table(table_rows(results), markdown=args.markdown))
    print()
    print(render_targets(results["targets"], markdown=args.markdown))


if __name__ == "__main__":
    main()
