#!/usr/bin/env bash
# The test command (README, CI): CPU tests, Triton-interpreter tests, CUDA/Triton compile checks.
# pytest's exit code 5 (no test collected) is turned into a failure with a message: a run that tests
# nothing must not pass.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${ZSQFAST_VENV:-$PWD/.venv}
# shellcheck disable=SC1091
[ -x "$VENV/bin/python" ] && . "$VENV/bin/activate"
export TRITON_INTERPRET=1
python -m pytest -q -ra --durations=15 tests "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi
exit $rc
