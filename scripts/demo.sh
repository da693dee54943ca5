#!/usr/bin/env bash
# The main job: a coordinator asks a memory shard questions through the
# SQLite bridge and gets cited answers in milliseconds.
#
# Builds the release binaries, makes a temporary bridge and conversation,
# starts autopoll-server (built-in engine over this project's docs) and
# autopoll-poller, asks questions through the bridge as a coordinator would,
# prints each answer with its sources and timings, then stops everything
# cleanly. Leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${AUTOPOLL_BIN_DIR:-}" ]; then
  bin=$AUTOPOLL_BIN_DIR   # prebuilt binaries (the tests use their debug build)
else
  cargo build --release --locked --quiet --bins
  bin=${CARGO_TARGET_DIR:-$PWD/target}/release
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/autopoll-demo.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
export AUTOPOLL_DB=$work/bridge.db AUTOPOLL_RUNTIME_DIR=$work/run AUTOPOLL_NAME=demo
# Bold headings on a terminal only, never into files and pipes.
if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold= plain=; fi
say() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }
field() { sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p"; }

say "a bridge and a conversation (session a: coordinator, session b: memory shard)"
"$bin/autopoll" bridge init
conv_json=$("$bin/autopoll" bridge create --role-a coordinator --role-b memory_shard --json)
export AUTOPOLL_CONVERSATION; AUTOPOLL_CONVERSATION=$(field conversation_id <<<"$conv_json")
token_a=$(field session_a_token <<<"$conv_json")
token_b=$(field session_b_token <<<"$conv_json")
echo "conversation $AUTOPOLL_CONVERSATION"

say "the shard: autopoll-server over docs/ and README.md, and autopoll-poller for session b"
"$bin/autopoll-server" -q --context docs --context README.md &
pids+=($!)
for _ in $(seq 200); do "$bin/autopoll" status >/dev/null 2>&1 && break; sleep 0.05; done
AUTOPOLL_TOKEN=$token_b "$bin/autopoll-poller" -q --concurrency 4 &
pids+=($!)
echo "server pid ${pids[0]}, poller pid ${pids[1]}"

say "the coordinator asks through the bridge (autopoll bridge ask)"
for q in "How is a second answer from a stale poller prevented?" \
         "What does the server do on SIGTERM?" \
         "Which timestamp shape does the bridge write?"; do
  printf '\n%s? %s%s\n' "$bold" "$q" "$plain"
  AUTOPOLL_TOKEN=$token_a "$bin/autopoll" bridge ask --session a --timeout 30 "$q" >"$work/answer" 2>"$work/timing"
  head -14 "$work/answer"
  [ "$(wc -l <"$work/answer")" -le 14 ] || echo "  [...]"
  cat "$work/timing"
done

say "a burst: 200 queries queued at once, then answered"
start=$(date +%s%N)
for i in $(seq 200); do
  AUTOPOLL_TOKEN=$token_a "$bin/autopoll" bridge send --session a --query "question $i: what is a lease?" >/dev/null
done
for _ in $(seq 600); do
  answered=$("$bin/autopoll" bridge status --json | sed -n 's/.*"answered": \([0-9]*\).*/\1/p' | sort -n | tail -1)
  [ "${answered:-0}" -ge 203 ] && break
  sleep 0.05
done
took=$(( ($(date +%s%N) - start) / 1000000 ))
if [ "${answered:-0}" -lt 203 ]; then
  echo "demo: only ${answered:-0} of 203 questions were answered within 30 s" >&2
  exit 1
fi
echo "$answered answered (3 asked + 200 queued); sending and answering took $took ms"

say "status: the server and the bridge"
"$bin/autopoll" status --db "$AUTOPOLL_DB"

say "stopping (SIGTERM): both exit 0"
kill -TERM "${pids[1]}"; wait "${pids[1]}"; echo "poller exited $?"
kill -TERM "${pids[0]}"; wait "${pids[0]}"; echo "server exited $?"
pids=()
