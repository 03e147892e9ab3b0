#!/usr/bin/env bash
# Creates .venv (or reuses it) with everything SAM2FewShot needs, at pinned versions.
# torch comes first and alone; sam2 comes with --no-deps because its requirement on torchvision
# would drag in CUDA wheels that do not import beside a CPU torch (and sam2's video predictor
# does not need torchvision at all).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
SAM2_VERSION=1.1.0
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
q=-q
python -c "import torch" 2>/dev/null || pip install $q "torch==${TORCH_VERSION}"
python -c "import sam2" 2>/dev/null || SAM2_BUILD_CUDA=0 pip install $q --no-deps --no-build-isolation "sam2==${SAM2_VERSION}"
pip install $q -e ".[test,plot]"
python -c "import torch, sam2, SAM2FewShotLib; print('environment ready: torch', torch.__version__, '| sam2 ok | SAM2FewShotLib', SAM2FewShotLib.__version__)"
