"""Where the CPU goes while ``siam serve`` is under load: its event loop, its other threads (the model's),
and how much of the machine stays idle, next to the rate the clients got.

On a few cores the HTTP side and the model share them, so a served rate below the model's limit is either
the HTTP side's CPU or idle time (the model waiting on something). Per-thread CPU comes from
``/proc/<pid>/task/*/stat`` and the machine's idle share from ``/proc/stat``, read before and after the
measured window (Linux only). With ``--serve-args "--workers N"`` it also gives each child process's CPU
(the workers and the model process, busiest first), which shows whether the connections spread over the
workers. Give ``--checkout`` twice to compare two checkouts of this repository in
alternating rounds (the first place rotating), e.g. ``git worktree add /tmp/before HEAD~1``:

    python -m benchmarks.cpu_share --samples 16 --concurrency 64 --rounds 3 --checkout . --checkout /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.load import run_in_process
from benchmarks.machine import describe, summary_line
from benchmarks.report import in_turn
from benchmarks.servers import ServerProcess, service_spec
from service.settings import DEFAULT_CHECKPOINT, DEFAULT_ONNX_CACHE

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Share:
    """One measured window: the clients' rate and where the CPU went, in cores (1.0 = one core busy)."""

    checkout: str
    rows_per_s: float
    p50_ms: float
    event_loop_cores: float  # the server's main thread: HTTP, decoding, the engine's dispatch
    other_threads_cores: float  # the model thread and ONNX Runtime's threads
    idle_share: float  # of the whole machine, 0-1
    # With --workers: each child process (the workers, the model process), busiest first. An uneven split
    # shows connections gathered on a few workers.
    child_cores: list[float] = field(default_factory=list)


def thread_ticks(pid: int) -> dict[int, int]:
    """User + system clock ticks of each thread of ``pid``."""
    ticks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended
        ticks[int(task.name)] = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return ticks


def children_ticks(pid: int) -> dict[int, int]:
    """User + system clock ticks of each child process of ``pid`` (all its threads)."""
    ticks = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:  # ppid (field 4 of stat)
            ticks[int(proc.name)] = int(fields[11]) + int(fields[12])
    return ticks


def machine_ticks() -> tuple[int, int]:
    """(idle, total) clock ticks of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[3] + values[4], sum(values)  # idle + iowait


def commit_of(checkout: Path) -> str:
    """The checkout's commit, ``+`` when its tracked files differ from it (``?`` outside git)."""
    def git(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(checkout), *cmd], capture_output=True, text=True, check=False)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "?"
        return head.stdout.strip() + ("+" if git("diff", "--quiet", "HEAD").returncode else "")
    except OSError:  # no git on this machine
        return "?"


def measure(checkout: Path, args: argparse.Namespace) -> Share:
    spec = service_spec(args.checkpoint.resolve(), args.threads, args.backend, "cpu",
                        (checkout / DEFAULT_ONNX_CACHE).resolve())
    spec.args += shlex.split(args.serve_args)
    with ServerProcess(spec, cwd=checkout) as server:
        pid = server.proc.pid
        run_in_process(server.predict_url, args.samples, args.concurrency, 1.0, 0.5)  # warm every path
        threads_before, children_before = thread_ticks(pid), children_ticks(pid)
        (idle_before, total_before), start = machine_ticks(), time.perf_counter()
        load = run_in_process(server.predict_url, args.samples, args.concurrency, args.duration, 0.0)
        elapsed = time.perf_counter() - start
        threads_after, children_after = thread_ticks(pid), children_ticks(pid)
        idle_after, total_after = machine_ticks()
    used = {tid: (ticks - threads_before.get(tid, 0)) / TICKS / elapsed for tid, ticks in threads_after.items()}
    children = sorted(((ticks - children_before.get(child, 0)) / TICKS / elapsed
                       for child, ticks in children_after.items()), reverse=True)
    return Share(str(checkout), load.rows_per_s, load.p50_ms, used.get(pid, 0.0),
                 sum(v for tid, v in used.items() if tid != pid),
                 (idle_after - idle_before) / max(1, total_after - total_before), [round(c, 3) for c in children])


def main(argv: list[str] | None = None) -> list[Share]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_share", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, nargs="?", default=DEFAULT_CHECKPOINT)
    p.add_argument("--samples", type=int, default=16, help="m of every request (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop clients (default: %(default)s)")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per checkout (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the service's CPU threads")
    p.add_argument("--backend", default="onnx", help="the service's backend (default: %(default)s)")
    p.add_argument("--serve-args", default="", help="more `siam serve` arguments, one string")
    p.add_argument("--checkout", type=Path, action="append", default=None,
                   help="a checkout of this repository to serve from; repeat to compare (default: this one)")
    p.add_argument("--output", type=Path, default=None, help="also write the rounds as JSON here")
    args = p.parse_args(argv)
    checkouts = [c.resolve() for c in args.checkout or [Path(__file__).resolve().parents[1]]]
    print("command: python -m benchmarks.cpu_share " + shlex.join(argv))
    print("machine: " + summary_line(describe(torch.device("cpu"))))
    print("checkouts: " + ", ".join(f"{c} at {commit_of(c)}" for c in checkouts))
    shares: list[Share] = []
    for r in range(args.rounds):
        for checkout in in_turn(checkouts, r):
            share = measure(checkout, args)
            shares.append(share)
            print(f"round {r + 1} {checkout}: {share.rows_per_s:.0f} rows/s, p50 {share.p50_ms:.1f} ms; event loop "
                  f"{share.event_loop_cores:.2f} cores, other threads {share.other_threads_cores:.2f}, machine idle "
                  f"{share.idle_share:.1%}" + (f"; child processes {', '.join(f'{c:.2f}' for c in share.child_cores)}"
                                               f" cores" if share.child_cores else ""), flush=True)
    for checkout in checkouts:
        mine = [s for s in shares if s.checkout == str(checkout)]
        rates, idle = [s.rows_per_s for s in mine], [s.idle_share for s in mine]
        print(f"{checkout}: median {statistics.median(rates):.0f} rows/s ({min(rates):.0f}-{max(rates):.0f}), "
              f"event loop {statistics.median(s.event_loop_cores for s in mine):.2f} cores, machine idle "
              f"{statistics.median(idle):.1%} ({min(idle):.1%}-{max(idle):.1%})")
    if args.output:
        args.output.write_text(json.dumps({"command": "python -m benchmarks.cpu_share " + shlex.join(argv),
                                           "machine": describe(torch.device("cpu")),
                                           "commits": {str(c): commit_of(c) for c in checkouts},
                                           "rounds": [asdict(s) for s in shares]}, indent=1) + "\n")
    return shares


if __name__ == "__main__":
    main()
