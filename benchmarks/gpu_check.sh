#!/usr/bin/env bash
# The GPU check: run as is on a machine with a CUDA GPU, after ./run_tests.sh's setup or in any
# environment with a CUDA PyTorch and this project installed. Under 8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: gpu_check_out)
#
#   1 cuda_tests   the suite's CUDA-marked tests: bfloat16 autocast, offloading GPU -> disk -> GPU,
#                  the worker on cuda, equivalence with stock sam2 on the GPU
#   2 equivalence  bench --check-equivalence on cuda: every SAM2 method and preset against stock sam2
#   3 peer_speed   sam2.1 tiny at 1024 px, 200 slices, 3 structures: seconds per volume, time outside
#                  the model's forwards, ratio against the JPEG-folder + stock sam2 pipeline
#   4 memory       peak GPU (and host) memory at 200 and 800 slices, one fresh process each
#   5 warm         re-propagation of 20 slices on an encoded 200-slice volume
#   6 batch        cohort throughput on cuda: segment per case against batch
#   7 click        live-session click latency through the worker (warm, cold, busy; encode per slice)
#                  at 256, 512 and 1024 px, fp32 and the default precision
#
# Random weights throughout: times, memory and equivalence are real, no accuracy is claimed. Every
# step's output goes to OUT_DIR/<step>.log and its figures to OUT_DIR; a summary is printed and
# written to OUT_DIR/summary.json. Exit status 1 if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DATA=${SAM2FEWSHOT_DATA:-../shared/data/msd_hippocampus}
SUPPORT=hippocampus_184
mkdir -p "$OUT"

if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check: this Python ($PY) has no CUDA GPU (torch.cuda.is_available() is false); run it where one is" >&2
  exit 2
fi
if [ ! -d "$DATA" ]; then  # no shared data here: five synthetic labelled cases instead
  DATA="$OUT/cases"
  SUPPORT=synthetic_1
  "$PY" - "$DATA" <<'PYEOF'
import sys
from pathlib import Path
sys.path.insert(0, "SAM2FewShot")
from SAM2FewShotLib.bench.synthetic import synthetic_case
from SAM2FewShotLib.io.volume_io import write_labels, write_volume
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
for n in range(1, 6):
    volume, labels = synthetic_case(32, 96, 2, seed=n)
    write_volume(volume, folder / f"synthetic_{n}_img.nii.gz")
    write_labels(labels, folder / f"synthetic_{n}_label.nii.gz")
PYEOF
fi

CLI=("$PY" -m SAM2FewShotLib.cli)
MODEL=(--random-weights --device cuda --quiet)
METHODS=propagate,matched-support:pair,matched-support:video,matched-support:video+memory,retrieval,guided:registration,guided:sam2
failed=()
step() {
  local name=$1; shift
  local start=$(date +%s)
  printf '%-12s ' "$name"
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "ok ($(( $(date +%s) - start )) s)"
  else
    echo "FAILED ($(( $(date +%s) - start )) s), see $OUT/$name.log"
    failed+=("$name")
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/device.txt" 2>&1 || true
step cuda_tests "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs -s Testing/sam2/test_cuda.py
step equivalence "${CLI[@]}" bench --check-equivalence --data "$DATA" --max-cases 1 --support "$SUPPORT" \
  --methods "$METHODS" --preset matched-support,fs-medsam2,fate-sam "${MODEL[@]}" --out "$OUT/equivalence"
step peer_speed "${CLI[@]}" bench --peer-speed 200 --synthetic-size 512 --synthetic-structures 3 "${MODEL[@]}" \
  --out "$OUT/peer_speed"
step memory "${CLI[@]}" bench --memory-scaling 200,800 --synthetic-size 512 --synthetic-structures 3 "${MODEL[@]}" \
  --out "$OUT/memory"
step warm "$PY" benchmarks/warm_repropagation.py --slices 200 --size 512 --image-size 1024 --range 20 \
  --device cuda --out "$OUT/warm_repropagation.json"
step batch "$PY" benchmarks/cohort_throughput.py --data "$DATA" --support "$SUPPORT" --out "$OUT/cohort" \
  --device cuda --image-size 1024 --rows saved,batch
step click "$PY" benchmarks/click_latency.py --device cuda --slices 64 --json "$OUT/click_latency.json"

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(path):
    try:
        return json.loads((out / path).read_text())
    except (OSError, ValueError):
        return None
summary = {"device": (out / "device.txt").read_text().strip() if (out / "device.txt").exists() else None}
eq = (load("equivalence/results.json") or {}).get("equivalence")
if eq:
    summary["equivalence"] = {r["method"]: {"max_abs_logit_diff": r.get("max_abs_logit_diff"), "dice": r.get("dice"),
                                            "equal": r["equal"], **({"error": r["error"]} if "error" in r else {})}
                              for r in eq}
peer = (load("peer_speed/results.json") or {}).get("peer_speed")
if peer:
    summary["peer_speed"] = {"slices": peer["slices"], "image_size": peer["image_size"],
                             "ours_s_per_volume": peer["ours"]["wall_s"],
                             "ours_outside_model_s": peer["ours"]["outside_model_s"],
                             "reference_s_per_volume": peer["reference"]["wall_s"],
                             "ratio_reference_over_ours": peer["ratio_reference_over_ours"]}
memory = (load("memory/results.json") or {}).get("memory_scaling")
if memory:
    summary["memory"] = {p["slices"]: {"peak_gpu_mb": p.get("peak_gpu_mb"), "peak_rss_above_start_mb":
                                       p.get("peak_rss_above_start_mb"), "seconds": p.get("seconds")}
                         for p in memory["points"]}
summary["warm_repropagation"] = load("warm_repropagation.json")
summary["batch"] = load("cohort/results.json")
summary["click_latency"] = (load("click_latency.json") or {}).get("click_latency")
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PYEOF

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: failed steps: ${failed[*]} (logs in $OUT)"
  exit 1
fi
echo "gpu_check: all steps passed; figures in $OUT"
