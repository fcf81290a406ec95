"""Run every mutant of one module against the given test files, directly, without mutmut's test map.

mutmut 3 runs, for each mutant, only the tests its stats run saw calling the mutated function. Calls
made on other threads (the engine's worker, TestClient's event loop) are missed or credited to the
wrong test, so mutmut reports survivors that the tests do kill. This runner switches each mutant on
with MUTANT_UNDER_TEST inside `mutants/` and runs all the given test files (-x), in a child forked
from a parent that has already imported the heavy libraries, so a mutant costs its tests only.

    mutmut run            # generates mutants/ (stop it once "Running clean tests" shows, if you like)
    python tests/recheck_mutants.py service.engine tests/test_engine.py
    python tests/recheck_mutants.py service.engine tests/test_engine.py tests/test_service_api.py --survivors

Results are written to mutants/recheck-<module>.json as they come (a re-run resumes) and summed at
the end: killed (a test failed), timeout (killed by the time bound), survived.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

PYTEST_ARGS = ["-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", "-m", "not subprocess"]


def mutant_names(module: str) -> list[str]:
    """All mutant names mutmut generated for `module` (from its .meta file)."""
    meta = Path(*module.split(".")).with_suffix(".py.meta")
    return sorted(json.loads(meta.read_text())["exit_code_by_key"])


def pytest_args(tests: list[str]) -> list[str]:
    """The tests by absolute path, with the configuration pytest finds from the mutants folder: each child
    runs in a folder of its own (below), where relative paths would find nothing."""
    here = Path.cwd()
    config = next(p for p in (here / "pyproject.toml", here.parent / "pyproject.toml") if p.is_file())
    return [*PYTEST_ARGS, "-c", str(config), "--rootdir", str(config.parent), *(str(here / t) for t in tests)]


def run_child(mutant: str, args: list[str], cwd: str) -> int:
    """Fork; the child runs pytest with the mutant on, in ``cwd``, and exits with pytest's code. A mutant
    that writes a file where it should not (a path turned into "None") writes it in ``cwd``, which the parent
    deletes, not in mutants/, where a later mutant would find it (one survived that way)."""
    pid = os.fork()
    if pid == 0:
        os.environ["MUTANT_UNDER_TEST"] = mutant
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.setsid()
        os.chdir(cwd)
        import pytest

        code = pytest.main(args)
        os._exit(int(code))
    return pid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", help="dotted module whose mutants to run, e.g. service.engine")
    parser.add_argument("tests", nargs="+", help="test files, relative to the checkout")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds before a mutant counts as a timeout")
    parser.add_argument("--survivors", action="store_true",
                        help="run the recorded survivors again (with more test files, or tests added since)")
    parser.add_argument("--functions", default=None, metavar="NAME,NAME",
                        help="only the mutants of these functions (e.g. after they changed: drop their records first)")
    args = parser.parse_args()

    os.chdir("mutants")
    sys.path.insert(0, os.getcwd())
    # The heavy imports happen once, here; no torch op runs in the parent, so forking stays safe.
    import fastapi  # noqa: F401
    import torch  # noqa: F401

    # The mutated module is compiled once and its bytecode kept for every child: with PYTHONDONTWRITEBYTECODE
    # set, each would compile it again (a module of 1,400 mutants is 5.6 MB of source: seconds per mutant).
    # Importing it here instead would be faster still, but whatever it sets up in torch at import would be
    # forked with it, and a child's first parallel op could then hang.
    sys.dont_write_bytecode = False
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

    record_path = Path(f"recheck-{args.module}.json")
    record: dict[str, str] = json.loads(record_path.read_text()) if record_path.exists() else {}

    # A test newer than the mutants' source would fail on every mutant and pass them all off as
    # killed: the tests must pass with no mutant switched on first.
    baseline_start = time.monotonic()
    test_args = pytest_args(args.tests)
    scratch = Path(tempfile.mkdtemp(prefix="recheck-"))
    pid = run_child("none", test_args, tempfile.mkdtemp(dir=scratch))
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        print("the tests fail on mutants/ with no mutant switched on: regenerate the mutants", file=sys.stderr)
        return 2
    print(f"baseline passes in {time.monotonic() - baseline_start:.1f} s", flush=True)

    todo = [m for m in mutant_names(args.module) if m not in record or (args.survivors and record[m] == "survived")]
    if args.functions:
        todo = [m for m in todo if any(f"{name}__mutmut_" in m for name in args.functions.split(","))]
    running: dict[int, tuple[str, float, str]] = {}
    while todo or running:
        while todo and len(running) < args.jobs:
            mutant = todo.pop(0)
            cwd = tempfile.mkdtemp(dir=scratch)
            running[run_child(mutant, test_args, cwd)] = (mutant, time.monotonic(), cwd)
        time.sleep(0.2)
        for pid, (mutant, started, cwd) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0 and time.monotonic() - started > args.timeout:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                outcome = "timeout"
            elif done == 0:
                continue
            else:
                outcome = "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
            del running[pid]
            shutil.rmtree(cwd, ignore_errors=True)
            record[mutant] = outcome
            record_path.write_text(json.dumps(record, indent=1, sort_keys=True))
            print(f"{outcome:8s} {mutant}  ({len(record)} done, {len(todo)} to go)", flush=True)

    shutil.rmtree(scratch, ignore_errors=True)
    counts = {k: sum(v == k for v in record.values()) for k in ("killed", "timeout", "survived")}
    print(f"{args.module}: {len(record)} mutants: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
