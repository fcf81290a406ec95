#!/usr/bin/env bash
# Re-run mutmut's survivors, timeouts and unchecked mutants directly: each mutant switched on by
# MUTANT_UNDER_TEST inside mutants/, the given test files run by pytest (-x, each bounded by TIMEOUT_S).
# mutmut's own map from functions to tests misses tests that reach code on other threads (the engine's
# worker, TestClient's event loop), so its "survived" needs this check. Prints "<exit code> <mutant>":
# 0 survived, 1 killed, 124 killed by the time bound.
#
#   cd <checkout with a finished or stopped `mutmut run`>
#   tests/recheck_mutants.sh service.engine tests/test_engine.py tests/test_sequential.py
set -uo pipefail
prefix="${1:?usage: tests/recheck_mutants.sh MODULE_PREFIX TEST_FILE...}"
shift
timeout_s="${TIMEOUT_S:-240}"
# The tests must pass on mutants/ with no mutant switched on: a test newer than the run's source would
# otherwise fail on every mutant and pass them all off as killed.
if ! (cd mutants && MUTANT_UNDER_TEST=none timeout "$timeout_s" python -m pytest -q -x -p no:cacheprovider \
      -p no:randomly -m "not subprocess" "$@" >/dev/null 2>&1); then
  echo "the tests fail on mutants/ with no mutant switched on: regenerate the mutants (mutmut run)" >&2
  exit 2
fi
mutmut results --all true 2>/dev/null | grep "^ *${prefix}" | grep -v ": killed" | sed 's/:.*//; s/ //g' |
  while read -r mutant; do
    (cd mutants && MUTANT_UNDER_TEST="$mutant" timeout "$timeout_s" python -m pytest -q -x -p no:cacheprovider \
      -p no:randomly -m "not subprocess" "$@" >/dev/null 2>&1)
    echo "$? $mutant"
  done
