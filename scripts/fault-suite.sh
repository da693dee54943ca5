#!/usr/bin/env bash
# The fault suite at full size (AUTOPOLL_FAULT_FULL=1), release build, one
# case at a time, printing each case's FIGURE line. Takes several minutes.
#   scripts/fault-suite.sh [CASE-NAME-FILTER]
# Needs root for the full-disk case (it mounts a small tmpfs) and setpriv
# for the other-user case; python3 for the engine-instance case.
set -euo pipefail
cd "$(dirname "$0")/.."
export AUTOPOLL_FAULT_FULL=1
out=$(mktemp)
trap 'rm -f "$out"' EXIT
if cargo test --release --locked --test faults -- --test-threads=1 --nocapture "$@" >"$out" 2>&1; then
  status=0
else
  status=$?
fi
grep -E '^(FIGURE|test |test result)' "$out" || true
if [ "$status" -ne 0 ]; then
  echo "fault suite FAILED; full output:" >&2
  cat "$out" >&2
fi
exit "$status"
