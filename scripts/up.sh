#!/usr/bin/env bash
# Run a shard in tmux: autopoll-server in one pane, autopoll-poller in the other.
#
#   scripts/up.sh [--db PATH] [--conversation ID --token TOKEN] [--name NAME] [--context PATH]...
#
# Without --conversation, a bridge (default ./autopoll-bridge.db) and a new
# conversation are created, and the coordinator's token is printed. Contexts
# default to ./docs. Prints the line to attach and the line to ask from a
# third shell. The tmux session is named autopoll-NAME.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

db=${AUTOPOLL_DB:-$PWD/autopoll-bridge.db}
conv=${AUTOPOLL_CONVERSATION:-}
token=${AUTOPOLL_TOKEN:-}
name=${AUTOPOLL_NAME:-default}
contexts=()
while [ $# -gt 0 ]; do
  case $1 in
    --db) db=$2; shift 2 ;;
    --conversation) conv=$2; shift 2 ;;
    --token) token=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --context) contexts+=("$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"); shift 2 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "up.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#contexts[@]} -gt 0 ] || contexts=("$PWD/docs")
command -v tmux >/dev/null || { echo "up.sh: tmux is not installed" >&2; exit 1; }

cargo build --release --locked --quiet --bins --manifest-path "$here/Cargo.toml"
bin=${CARGO_TARGET_DIR:-$here/target}/release
case $db in /*) ;; *) db=$PWD/$db ;; esac

coordinator_token=
if [ -z "$conv" ]; then
  "$bin/autopoll" bridge init --db "$db" >/dev/null
  json=$("$bin/autopoll" bridge create --db "$db" --role-a coordinator --role-b memory_shard --json)
  conv=$(sed -n 's/.*"conversation_id": *"\([^"]*\)".*/\1/p' <<<"$json")
  token=$(sed -n 's/.*"session_b_token": *"\([^"]*\)".*/\1/p' <<<"$json")
  coordinator_token=$(sed -n 's/.*"session_a_token": *"\([^"]*\)".*/\1/p' <<<"$json")
fi
[ -n "$token" ] || { echo "up.sh: --conversation needs --token (the shard session's token)" >&2; exit 2; }

session=autopoll-$name
if tmux has-session -t "$session" 2>/dev/null; then
  echo "up.sh: tmux session $session already exists; attach with: tmux attach -t $session" >&2
  exit 1
fi
ctx_args=$(printf ' --context %q' "${contexts[@]}")
tmux new-session -d -s "$session" -n shard \
  "$(printf '%q' "$bin/autopoll-server") --name $(printf '%q' "$name")$ctx_args; read -r -p 'server exited; press enter'"
tmux split-window -t "$session" -h \
  "AUTOPOLL_TOKEN=$(printf '%q' "$token") $(printf '%q' "$bin/autopoll-poller") --db $(printf '%q' "$db") --conversation $conv --name $(printf '%q' "$name"); read -r -p 'poller exited; press enter'"

echo "shard running in tmux session $session (server left, poller right)"
echo "attach:   tmux attach -t $session"
echo "status:   $bin/autopoll status --name $name --db $db"
if [ -n "$coordinator_token" ]; then
  echo "ask:      AUTOPOLL_TOKEN=$coordinator_token $bin/autopoll bridge ask --db $db --conversation $conv --session a \"your question\""
else
  echo "ask:      AUTOPOLL_TOKEN=<coordinator token> $bin/autopoll bridge ask --db $db --conversation $conv --session a \"your question\""
fi
echo "directly: $bin/autopoll ask --name $name \"your question\""
echo "stop:     tmux kill-session -t $session   (both get SIGHUP and stop cleanly)"
