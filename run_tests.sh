#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole pytest suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
# Text in UTF-8 whatever the machine's locale (a CI machine may have none): the CLI's progress bars and
# messages are UTF-8, and tests read them from subprocesses.
export PYTHONUTF8=1
exec .venv/bin/python -m pytest -q "$@"
