#!/usr/bin/env bash
# The test command of the README: creates or reuses .venv, installs what is missing, runs pytest.
#   bash tests/run.sh                 # default suite (excludes tests marked slow)
#   bash tests/run.sh -m slow         # the slow tier only
#   bash tests/run.sh tests/unit -k lsh   # any pytest arguments
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/ensure_venv.sh
if [[ " $* " != *" -m "* ]]; then
  set -- -m "not slow" "$@"
fi
exec "$PY" -m pytest "$@"
