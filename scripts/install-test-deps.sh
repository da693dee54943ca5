#!/usr/bin/env bash
# Install the outside programs the tests run, pinned by committed lock files,
# into git-ignored folders of this checkout. Used by the tests themselves
# (tests/claude_cli.rs runs it before its first case) and by .ci/run alike.
#
#   scripts/install-test-deps.sh claude    Claude Code CLI: `npm ci` in tests/claude-cli
#                                          (package.json + package-lock.json), npm's
#                                          download cache in .cache/npm
#
# Prints the installed program's path on stdout. Idempotent and quick when
# nothing changed (a stamp holds the lock file's hash); safe to run from
# several test processes at once (flock). When npm is missing or its registry
# cannot be reached it fails loudly (exit 1) and says so: tests never skip.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
what=${1:-}

die() { echo "install-test-deps: $*" >&2; exit 1; }

install_claude() {
  local dir="$top/tests/claude-cli"
  local bin="$dir/node_modules/.bin/claude"
  local want stamp
  command -v npm >/dev/null || die "npm is not installed: install Node.js 20+ with npm (apt-get install nodejs npm), then rerun"
  want=$(sed -n 's/.*"@anthropic-ai\/claude-code": *"\([^"]*\)".*/\1/p' "$dir/package.json" | head -n 1)
  [ -n "$want" ] || die "no @anthropic-ai/claude-code version pinned in $dir/package.json"
  stamp=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
  mkdir -p "$top/.cache"
  exec 9>"$top/.cache/install-claude.lock"
  flock -w 600 9 || die "another install held the lock for 10 minutes"
  if [ -x "$bin" ] && [ "$(cat "$dir/node_modules/.autopoll-stamp" 2>/dev/null)" = "$stamp" ] \
     && "$bin" --version 2>/dev/null | grep -qF "$want"; then
    echo "$bin"
    return
  fi
  echo "install-test-deps: npm ci in tests/claude-cli (@anthropic-ai/claude-code $want)" >&2
  if ! (cd "$dir" && timeout 900 npm ci --no-audit --no-fund --loglevel=error \
          --cache "$top/.cache/npm" --prefer-offline >&2); then
    die "npm ci failed in $dir: is the npm registry reachable (npm ping)? The Claude Code tests need the real CLI and do not skip"
  fi
  local got
  got=$("$bin" --version 2>&1) || die "the installed claude does not run: $got (its native binary comes from the optional dependency @anthropic-ai/claude-code-linux-x64; was npm run with --omit=optional or --ignore-scripts?)"
  case "$got" in
    *"$want"*) ;;
    *) die "installed claude reports '$got', expected $want" ;;
  esac
  echo "$stamp" > "$dir/node_modules/.autopoll-stamp"
  echo "$bin"
}

case "$what" in
  claude) install_claude ;;
  *) die "usage: scripts/install-test-deps.sh claude" ;;
esac
