#!/usr/bin/env bash
# Check the systemd user units in docs/systemd/ with `systemd-analyze verify`
# (Debian's systemd package, installed here when missing and possible).
#
#   scripts/check-units.sh [BIN_DIR]
#
# BIN_DIR holds the built autopoll-server and autopoll-poller (default
# ${CARGO_TARGET_DIR:-target}/debug). verify wants ExecStart's program to
# exist, so the units are checked exactly as shipped, with a throw-away HOME
# whose .cargo/bin links to BIN_DIR (the units use %h/.cargo/bin), an env file
# from docs/systemd/example.env, and one instance (`demo`) of each template.
#
# verify exits 0 even for unknown keys and bad values (it only warns), so any
# output counts as a failure. Without systemd-analyze the script says loudly
# that nothing was verified and exits 0, so CI on a machine without systemd
# still runs the rest; set REQUIRE_SYSTEMD_ANALYZE=1 to make that an error.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-${CARGO_TARGET_DIR:-$here/target}/debug}

# On a fresh CI machine, fetch Debian's systemd package (the checker only; no
# systemd is started). Skipped when not root or without apt-get.
if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "check-units: installing Debian's systemd package for systemd-analyze"
  timeout 300 apt-get install -y -qq systemd >/dev/null 2>&1 \
    || { timeout 300 apt-get update -qq >/dev/null 2>&1 && timeout 300 apt-get install -y -qq systemd >/dev/null 2>&1; } \
    || echo "check-units: could not install systemd"
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "check-units: NOT VERIFIED: systemd-analyze is not installed (Debian: apt-get install systemd);"
  echo "check-units: the unit files in docs/systemd/ were not checked on this machine."
  if [ "${REQUIRE_SYSTEMD_ANALYZE:-0}" = 1 ]; then
    exit 1
  fi
  exit 0
fi
for b in autopoll-server autopoll-poller; do
  if [ ! -x "$bin/$b" ]; then
    echo "check-units: $bin/$b is missing; build first (cargo build) or give BIN_DIR" >&2
    exit 1
  fi
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/autopoll-units.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/home/.cargo/bin" "$tmp/home/.config/autopoll" "$tmp/units" "$tmp/run"
chmod 700 "$tmp/run"
ln -s "$bin/autopoll-server" "$tmp/home/.cargo/bin/autopoll-server"
ln -s "$bin/autopoll-poller" "$tmp/home/.cargo/bin/autopoll-poller"
cp "$here/docs/systemd/example.env" "$tmp/home/.config/autopoll/demo.env"
units=()
for t in autopoll-server@.service autopoll-poller@.service; do
  cp "$here/docs/systemd/$t" "$tmp/units/$t"
  inst=${t/@./@demo.}
  ln -s "$t" "$tmp/units/$inst"
  units+=("$tmp/units/$t" "$tmp/units/$inst")
done

echo "check-units: $(systemd-analyze --version | head -n1)"
set +e
out=$(cd "$tmp/units" && HOME="$tmp/home" XDG_RUNTIME_DIR="$tmp/run" \
  systemd-analyze --user verify "${units[@]}" 2>&1)
rc=$?
set -e
if [ $rc -ne 0 ] || [ -n "$out" ]; then
  echo "check-units: systemd-analyze verify rejected the units (exit $rc):"
  echo "$out"
  exit 1
fi
echo "check-units: systemd-analyze verify accepts docs/systemd/autopoll-server@.service and autopoll-poller@.service"
