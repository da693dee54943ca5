#!/usr/bin/env bash
# A private PostgreSQL cluster for a test run (what .ci/run uses): Debian's
# server binaries, initdb in DIR, one server on 127.0.0.1 at a free port,
# trust authentication for the user `autopoll`, no fsync. Nothing listens
# beyond loopback.
#
#   scripts/pg-test-cluster.sh start DIR   start it; prints its admin URL
#                                          (postgres://autopoll@127.0.0.1:PORT/postgres),
#                                          which the tests take from AUTOPOLL_TEST_PG
#   scripts/pg-test-cluster.sh stop DIR    stop it (fast shutdown) and remove DIR
#
# As root the cluster runs as the `postgres` user (initdb refuses root).
# Fails loudly when the binaries are missing: `scripts/install-test-deps.sh postgres`.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-}
dir=${2:-}
die() { echo "pg-test-cluster: $*" >&2; exit 1; }
[ -n "$dir" ] || die "usage: scripts/pg-test-cluster.sh start|stop DIR"
bin=$("$top/scripts/install-test-deps.sh" postgres)
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    setpriv --reuid=postgres --regid=postgres --clear-groups "$@"
  else
    "$@"
  fi
}
case "$cmd" in
  start)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
    as_owner "$bin/initdb" -D "$dir/data" -U autopoll -A trust -E UTF8 --no-sync --locale=C >"$dir/initdb.log" 2>&1 \
      || die "initdb failed: $(cat "$dir/initdb.log")"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400 -c shared_buffers=64MB" \
      start >&2 || die "the server did not start: $(tail -n 20 "$dir/server.log" 2>/dev/null)"
    echo "postgres://autopoll@127.0.0.1:$port/postgres"
    ;;
  stop)
    if [ -f "$dir/data/postmaster.pid" ]; then
      as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >&2 || true
    fi
    rm -rf "$dir"
    ;;
  *) die "usage: scripts/pg-test-cluster.sh start|stop DIR" ;;
esac
