#!/usr/bin/env bash
# The test command: set up .venv, build fa3_jax, run the pytest suite (GPU tests skip without a
# Hopper GPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
set +e
python -m pytest -q -ra "$@" tests
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
