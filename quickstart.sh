#!/usr/bin/env bash
# One command on a fresh machine: set up .venv, fetch the example data, segment a query from a
# labelled support case, and print the Dice against the query's ground truth.
#   ./quickstart.sh [--data FOLDER] [--checkpoint FILE] [--model NAME] [--device auto|cuda|mps|cpu]
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
SAM2FEWSHOT_COMMAND=./quickstart.sh exec .venv/bin/sam2fewshot demo --out out/demo "$@"
