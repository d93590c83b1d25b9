#!/usr/bin/env bash
# Run a pytest selection N times in a row and count the runs that failed (a flakiness hunt:
# a test that fails once in N runs is a bug to fix at its root, never to retry).
#   bash tools/repeat_suite.sh 30 tests/distributed          # 30 runs of the distributed tests
#   OUT=/tmp/runs bash tools/repeat_suite.sh 5 tests/unit -k lsh
# One line per run (passed / failed counts, seconds, the failing test ids); every run's full
# output is kept in $OUT/run_<i>.log (default bench/out/repeat_suite). Exit status 1 if any
# run failed. Tests marked slow are left out unless the arguments give their own -m.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: bash tools/repeat_suite.sh RUNS [pytest arguments...]" >&2
  exit 2
fi
runs=$1; shift
if [[ " $* " != *" -m "* ]]; then
  set -- -m "not slow" "$@"
fi
out=${OUT:-bench/out/repeat_suite}
mkdir -p "$out"
py=${PY:-.venv/bin/python}
failed_runs=0
for ((i = 1; i <= runs; i++)); do
  start=$(date +%s)
  "$py" -m pytest -q -p no:cacheprovider "$@" > "$out/run_$i.log" 2>&1
  rc=$?
  summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed)|[0-9]+ (passed|failed|error)" "$out/run_$i.log" | tail -1)
  failures=$(grep -E "^(FAILED|ERROR) " "$out/run_$i.log" | cut -d' ' -f2 | tr '\n' ' ')
  (( rc != 0 )) && failed_runs=$((failed_runs + 1))
  echo "[$(date +%H:%M:%S)] run $i/$runs: rc $rc, $summary, $(( $(date +%s) - start )) s ${failures:+failed: $failures}"
done
echo "$failed_runs of $runs runs failed (logs: $out)"
(( failed_runs == 0 ))
