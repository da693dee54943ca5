#!/usr/bin/env bash
# Install the outside programs the tests run, pinned by committed lock files,
# into git-ignored folders of this checkout. Used by the tests themselves
# (tests/claude_cli.rs runs it before its first case) and by .ci/run alike.
#
#   scripts/install-test-deps.sh claude    Claude Code CLI: `npm ci` in tests/claude-cli
#                                          (package.json + package-lock.json), npm's
#                                          download cache in .cache/npm
#   scripts/install-test-deps.sh mcp       the official MCP Python SDK: a venv in
#                                          tests/mcp-client/.venv, `pip install
#                                          --require-hashes -r tests/mcp-client/requirements.txt`,
#                                          pip's download cache in .cache/pip
#   scripts/install-test-deps.sh postgres  Debian's postgresql server package (apt-get) when
#                                          no /usr/lib/postgresql/*/bin/initdb is there, plus
#                                          iproute2 (`ip netns`) for the multi-host test and openssl
#                                          (the TLS test's certificates); needs
#                                          root (CI) or prints the apt-get command to run
#
# Prints the installed program's path on stdout (for mcp: the venv's python). Idempotent and quick when
# nothing changed (a stamp holds the lock file's hash); safe to run from
# several test processes at once (flock). When npm or python3 is missing or a
# registry cannot be reached it fails loudly (exit 1) and says so: tests never skip.
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

install_mcp() {
  local dir="$top/tests/mcp-client"
  local venv="$dir/.venv"
  local py="$venv/bin/python"
  local want stamp
  command -v python3 >/dev/null || die "python3 is not installed: install Python 3.10+ with venv (apt-get install python3 python3-venv), then rerun"
  want=$(sed -n 's/^mcp==\([^ ]*\).*/\1/p' "$dir/requirements.txt" | head -n 1)
  [ -n "$want" ] || die "no mcp version pinned in $dir/requirements.txt"
  stamp=$(sha256sum "$dir/requirements.txt" | cut -d' ' -f1)
  mkdir -p "$top/.cache"
  exec 8>"$top/.cache/install-mcp.lock"
  flock -w 600 8 || die "another install held the lock for 10 minutes"
  if [ -x "$py" ] && [ "$(cat "$venv/.autopoll-stamp" 2>/dev/null)" = "$stamp" ] \
     && "$py" -c 'import importlib.metadata as m, sys; sys.exit(m.version("mcp") != sys.argv[1])' "$want" 2>/dev/null; then
    echo "$py"
    return
  fi
  echo "install-test-deps: pip install --require-hashes in tests/mcp-client/.venv (mcp $want)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv" >&2 || die "python3 -m venv failed: install the venv module (apt-get install python3-venv), then rerun"
  if ! timeout 900 "$py" -m pip install --quiet --disable-pip-version-check --require-hashes \
          --cache-dir "$top/.cache/pip" -r "$dir/requirements.txt" >&2; then
    die "pip install failed for $dir/requirements.txt: is PyPI reachable? The MCP tests need the real SDK and do not skip"
  fi
  "$py" -c 'import mcp.client.stdio, mcp.client.session' >&2 || die "the installed mcp package does not import"
  echo "$stamp" > "$venv/.autopoll-stamp"
  echo "$py"
}

install_postgres() {
  local initdb
  mkdir -p "$top/.cache"
  exec 7>"$top/.cache/install-postgres.lock"
  flock -w 900 7 || die "another install held the lock for 15 minutes"
  initdb=$(ls -1 /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$initdb" ] || ! command -v ip >/dev/null || ! command -v openssl >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
      die "PostgreSQL's server binaries (or iproute2, openssl) are missing: run \`sudo apt-get install -y postgresql iproute2 openssl\`, then rerun"
    fi
    echo "install-test-deps: apt-get install postgresql iproute2" >&2
    export DEBIAN_FRONTEND=noninteractive
    timeout 900 apt-get update -qq >&2 || die "apt-get update failed: are Debian's package mirrors reachable?"
    timeout 900 apt-get install -y -qq --no-install-recommends postgresql iproute2 openssl >&2 \
      || die "apt-get install postgresql failed; the PostgreSQL tests need the real server and do not skip"
    initdb=$(ls -1 /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$initdb" ] || die "postgresql is installed but no /usr/lib/postgresql/*/bin/initdb was found"
  fi
  echo "$(dirname "$initdb")"
}

case "$what" in
  claude) install_claude ;;
  mcp) install_mcp ;;
  postgres) install_postgres ;;
  *) die "usage: scripts/install-test-deps.sh claude|mcp|postgres" ;;
esac
