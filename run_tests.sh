#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole pytest suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
# Text in UTF-8 whatever the machine's locale (a CI machine may have none): the CLI's progress bars and
# messages are UTF-8, and tests read them from subprocesses.
export PYTHONUTF8=1
# Two test processes (pytest-xdist): many tests wait on a worker subprocess or a file, and two processes keep
# a 2-core CI machine busy meanwhile; tests of one xdist_group (the Ray ones) run in the same process.
# SAM2FEWSHOT_TEST_PROCESSES=0 runs them all in this process (-n 0), e.g. under a debugger.
exec .venv/bin/python -m pytest -q -n "${SAM2FEWSHOT_TEST_PROCESSES:-2}" --dist loadgroup "$@"
