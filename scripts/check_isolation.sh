#!/usr/bin/env bash
# Runs every test file on its own (pytest FILE, in a shuffled order of its own), to show that no test
# depends on what another file's tests left behind. Run by hand before resolving work that touches shared
# state; not in CI, which would run the suite twice. Usage: scripts/check_isolation.sh [FILE ...]
# Prints one line per file and a summary; exit code 1 when a file fails alone.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh >/dev/null || exit 2
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  mapfile -t files < <(find Testing -name 'test_*.py' | sort)
fi
failed=()
start=$(date +%s)
for file in "${files[@]}"; do
  t0=$(date +%s)
  if out=$(.venv/bin/python -m pytest -q -p no:cacheprovider "$file" 2>&1); then
    status=ok
  else
    status=FAILED
    failed+=("$file")
  fi
  summary=$(printf '%s\n' "$out" | grep -E '[0-9]+ (passed|failed|skipped|error)|no tests ran' | tail -1)
  seed=$(printf '%s\n' "$out" | grep -o 'randomly-seed=[0-9]*' | head -1)
  printf '%-7s %-55s %4ss  %s  %s\n' "$status" "$file" "$(( $(date +%s) - t0 ))" "$seed" "$summary"
done
echo "${#files[@]} files in $(( $(date +%s) - start )) s; ${#failed[@]} failed alone${failed:+: ${failed[*]}}"
[ ${#failed[@]} -eq 0 ]
