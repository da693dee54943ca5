#!/usr/bin/env bash
# Build in release mode and run the benchmarks; prints a table and writes
# bench-results/bench.json (--quick: seconds, a smoke test; default: the full run).
#   scripts/bench.sh [--quick] [--json-out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --quiet --bins
exec "${CARGO_TARGET_DIR:-$PWD/target}/release/autopoll-bench" --fixtures "$PWD/tests/fixtures" "$@"
