#!/usr/bin/env bash
# The main job, as far as it exists today. Builds the binaries, makes a
# temporary bridge and conversation, queues questions as a coordinator would,
# plays the shard's side by hand for one round trip, then starts the
# persistent server over the project's docs and asks it directly. (The poller
# that connects the two lands with issue 4.) Leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --quiet --bins
bin=$PWD/target/release
work=$(mktemp -d "${TMPDIR:-/tmp}/autopoll-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
export AUTOPOLL_DB=$work/bridge.db
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

say "a fresh bridge at $AUTOPOLL_DB"
"$bin/autopoll" bridge init

say "a conversation: session a = coordinator, session b = memory shard"
conv_json=$("$bin/autopoll" bridge create --role-a coordinator --role-b memory_shard --json)
export AUTOPOLL_CONVERSATION; AUTOPOLL_CONVERSATION=$(field '["conversation_id"]' <<<"$conv_json")
token_a=$(field '["session_a_token"]' <<<"$conv_json")
token_b=$(field '["session_b_token"]' <<<"$conv_json")
echo "conversation $AUTOPOLL_CONVERSATION (tokens in the environment, not on command lines)"

say "the coordinator queues three questions"
for q in "What did we decide about the cache?" "Why FIFOs and not sockets?" "Which tables are ours?"; do
  qid=$(AUTOPOLL_TOKEN=$token_a "$bin/autopoll" bridge send --session a --query "$q")
  echo "$qid  $q"
done

say "the queue"
"$bin/autopoll" bridge status

say "the coordinator asks and waits; the shard (played by this script) answers"
AUTOPOLL_TOKEN=$token_a "$bin/autopoll" bridge ask --session a --timeout 20 "Where is the claim table described?" \
  >"$work/answer.txt" 2>"$work/ask.err" &
ask_pid=$!
for _ in $(seq 200); do
  msgs=$(AUTOPOLL_TOKEN=$token_b "$bin/autopoll" bridge read --session b --json)
  qid=$(python3 -c '
import json, sys
for m in json.load(sys.stdin):
    q = json.loads(m["message"])
    if "claim" in q["question"]:
        print(q["query_id"])' <<<"$msgs")
  [ -n "$qid" ] && break
  sleep 0.05
done
echo "shard read the queue, found $qid"
response=$(python3 -c 'import json,sys; print(json.dumps({"type":"response","query_id":sys.argv[1],
  "answer":"autopoll_claims holds one lease per claimed message; see the claims section.",
  "sources":["docs/ARCHITECTURE.md:1-20"],"shard_id":"demo-by-hand","llm_type":"human",
  "response_time_sec":0.05}))' "$qid")
AUTOPOLL_TOKEN=$token_b "$bin/autopoll" bridge send --session b --action-type response "$response" >/dev/null
wait "$ask_pid"
cat "$work/answer.txt"; cat "$work/ask.err"

say "the queue afterwards"
"$bin/autopoll" bridge status

say "the persistent instance: autopoll-server over this project's docs"
export AUTOPOLL_RUNTIME_DIR=$work/run
"$bin/autopoll-server" -q --context docs --context README.md &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 200); do "$bin/autopoll" status >/dev/null 2>&1 && break; sleep 0.05; done
for q in "How is a stale owner's answer prevented?" "What happens when the server gets SIGTERM?" "Which timestamp shape does the bridge use?"; do
  printf '
[1m? %s[0m
' "$q"
  "$bin/autopoll" ask "$q" 2>&1 | head -14
done
printf '
[1m? (through scripts/ask.sh, plain sh)[0m
'
scripts/ask.sh "how do clients avoid interleaved frames?" 2>&1 | head -10
say "server status"
"$bin/autopoll" status
kill -TERM "$server_pid"; wait "$server_pid"
echo
echo "demo done. Automatic answering of bridge queries (autopoll-poller) lands with issue 4."
