#!/usr/bin/env bash
# Creates .venv (or reuses it) with everything SAM2FewShot needs, at pinned versions. Quiet, and a
# no-op when nothing changed since the last setup (a stamp of the pinned set in .venv).
#
# Order: torch alone first (a CPU build; see DESIGN), then the project with its pinned dependencies,
# which include sam2's own requirements except torchvision, then sam2 itself with --no-deps: its
# requirement on torchvision would drag in CUDA wheels that do not import beside a CPU torch, and
# sam2's video predictor does not need torchvision at all. pip reports that one deliberate gap as a
# "dependency conflict" whenever it re-checks the environment; that line alone is filtered out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
SAM2_VERSION=1.1.0
STAMP=.venv/.sam2fewshot-setup
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

wanted=$({ cat pyproject.toml scripts/setup_env.sh; echo "torch $TORCH_VERSION sam2 $SAM2_VERSION"; python -VV; } \
         | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ] && python -c "import torch, sam2, SAM2FewShotLib" 2>/dev/null; then
  echo "environment ready (.venv unchanged since its setup)"
  exit 0
fi

without_the_torchvision_gap() {
  # pip's conflict report, minus sam2's torchvision line (and its header when nothing else is reported)
  awk '/^ERROR: pip.s dependency resolver does not currently take into account/ { header = $0; next }
       /^sam2 [^ ]+ requires torchvision/ { next }
       { if (header != "") { print header; header = "" } print }' >&2
}

python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}')" 2>/dev/null \
  || pip install -q "torch==${TORCH_VERSION}"
pip install -q -e ".[test,plot]" 2> >(without_the_torchvision_gap)
python -c "import sam2" 2>/dev/null \
  || SAM2_BUILD_CUDA=0 pip install -q --no-deps --no-build-isolation "sam2==${SAM2_VERSION}" 2> >(without_the_torchvision_gap)
python -c "import torch, sam2, SAM2FewShotLib; print('environment ready: torch', torch.__version__, '| sam2 ok | SAM2FewShotLib', SAM2FewShotLib.__version__)"
echo "$wanted" > "$STAMP"
