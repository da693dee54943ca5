#!/usr/bin/env bash
# Run a shard in tmux: autopoll-server in one pane, autopoll-poller in the other.
#
#   scripts/up.sh [--db PATH|URL] [--conversation ID --token TOKEN | --tokens-file FILE] [--name NAME] [--context PATH]...
#
# Without --conversation, a bridge (default ./autopoll-bridge.db) and a new
# conversation are created, and the coordinator's token is printed. With
# --tokens-file (CONVERSATION_ID TOKEN lines, mode 0600), one poller serves
# every conversation in the file and follows its changes. Contexts
# default to ./docs. Waits until the server answers and the poller's
# heartbeat is in the bridge, then prints the line to attach and the line to
# ask from a third shell; exits 1 with the pane's output when either died.
# The tmux session is named autopoll-NAME. AUTOPOLL_BIN_DIR: use the binaries
# there instead of building release binaries.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "up.sh: $*" >&2; exit "${2:-1}"; }
usage_error() { echo "up.sh: $*" >&2; exit 2; }

db=${AUTOPOLL_DB:-$PWD/autopoll-bridge.db}
conv=${AUTOPOLL_CONVERSATION:-}
token=${AUTOPOLL_TOKEN:-}
tokens_file=${AUTOPOLL_TOKENS_FILE:-}
name=${AUTOPOLL_NAME:-default}
contexts=()
absolute() {
  # An existing path, made absolute; anything else is a usage error.
  [ -e "$1" ] || usage_error "context $1 does not exist (give files or folders that do, e.g. --context docs/)"
  local d b
  d=$(cd "$(dirname "$1")" && pwd) b=$(basename "$1")
  if [ "$b" = . ]; then printf '%s\n' "$d"; else printf '%s/%s\n' "$d" "$b"; fi
}
while [ $# -gt 0 ]; do
  case $1 in
    --db|--conversation|--token|--tokens-file|--name|--context)
      [ $# -ge 2 ] || usage_error "$1 needs a value (see --help)" ;;
  esac
  case $1 in
    --db) db=$2; shift 2 ;;
    --conversation) conv=$2; shift 2 ;;
    --token) token=$2; shift 2 ;;
    --tokens-file) tokens_file=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --context) contexts+=("$(absolute "$2")"); shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) usage_error "unknown argument $1 (see --help)" ;;
  esac
done
[ ${#contexts[@]} -gt 0 ] || contexts=("$(absolute "$PWD/docs")")
command -v tmux >/dev/null || die "tmux is not installed (apt-get install tmux)"

if [ -n "${AUTOPOLL_BIN_DIR:-}" ]; then
  bin=$AUTOPOLL_BIN_DIR
else
  cargo build --release --locked --quiet --bins --manifest-path "$here/Cargo.toml"
  bin=${CARGO_TARGET_DIR:-$here/target}/release
fi
case $db in /*|postgres://*|postgresql://*) ;; *) db=$PWD/$db ;; esac

coordinator_token=
convs=()
if [ -n "$tokens_file" ]; then
  [ -z "$conv" ] || usage_error "give --conversation/--token or --tokens-file, not both"
  [ -f "$tokens_file" ] || usage_error "the tokens file $tokens_file does not exist (one CONVERSATION_ID TOKEN a line, chmod 600)"
  case $tokens_file in /*) ;; *) tokens_file=$PWD/$tokens_file ;; esac
  # The conversations to wait for (the poller itself checks the file's mode and lines).
  while read -r c _; do
    case $c in ''|'#'*) ;; *) convs+=("$c") ;; esac
  done <"$tokens_file"
  [ ${#convs[@]} -gt 0 ] || usage_error "the tokens file $tokens_file lists no conversation"
elif [ -z "$conv" ]; then
  "$bin/autopoll" bridge init --db "$db" >/dev/null
  json=$("$bin/autopoll" bridge create --db "$db" --role-a coordinator --role-b memory_shard --json)
  conv=$(sed -n 's/.*"conversation_id": *"\([^"]*\)".*/\1/p' <<<"$json")
  token=$(sed -n 's/.*"session_b_token": *"\([^"]*\)".*/\1/p' <<<"$json")
  coordinator_token=$(sed -n 's/.*"session_a_token": *"\([^"]*\)".*/\1/p' <<<"$json")
fi
if [ -z "$tokens_file" ]; then
  [ -n "$token" ] || usage_error "--conversation needs --token (the shard session's token; or set AUTOPOLL_TOKEN)"
  convs=("$conv")
fi

session=autopoll-$name
if tmux has-session -t "$session" 2>/dev/null; then
  die "tmux session $session already exists; attach with: tmux attach -t $session"
fi

# The shard's token goes to the poller through a private file, never on a
# command line (`ps` shows those to every user).
secrets=$(mktemp -d "${XDG_RUNTIME_DIR:-${TMPDIR:-/tmp}}/autopoll-up.XXXXXX")
chmod 700 "$secrets"
( umask 077; printf '%s\n' "$token" >"$secrets/token" )

# The panes get the variables that choose where things are.
pass_env=
for v in AUTOPOLL_RUNTIME_DIR XDG_RUNTIME_DIR RUST_LOG; do
  [ -n "${!v:-}" ] && pass_env+="$v=$(printf '%q' "${!v}") "
done
ctx_args=$(printf ' --context %q' "${contexts[@]}")
server_cmd="$pass_env$(printf '%q' "$bin/autopoll-server") --name $(printf '%q' "$name")$ctx_args"
if [ -n "$tokens_file" ]; then
  # With a tokens file SIGHUP re-reads it instead of stopping the poller, so
  # the pane's shell turns the hangup of a killed tmux session into SIGTERM.
  poller_cmd="trap 'kill -TERM \$p 2>/dev/null' HUP TERM; ${pass_env}$(printf '%q' "$bin/autopoll-poller") --db $(printf '%q' "$db") --tokens-file $(printf '%q' "$tokens_file") --name $(printf '%q' "$name") & p=\$!; wait \$p; wait \$p"
else
  poller_cmd="${pass_env}AUTOPOLL_TOKEN=\$(cat $(printf '%q' "$secrets/token")) $(printf '%q' "$bin/autopoll-poller") --db $(printf '%q' "$db") --conversation $conv --name $(printf '%q' "$name")"
fi
tmux new-session -d -x 200 -y 50 -s "$session" -n shard "$server_cmd; echo \"autopoll-server exited \$?\"; read -r -p 'press enter'"
tmux split-window -t "$session" -h "$poller_cmd; echo \"autopoll-poller exited \$?\"; read -r -p 'press enter'"

# Wait for both to be up; when one died, show why and stop.
pane_dump() {
  for p in 0 1; do
    echo "--- pane $p ---" >&2
    tmux capture-pane -p -J -S - -t "$session.$p" 2>/dev/null | sed '/^$/d' >&2 || true
  done
}
fail() {
  echo "up.sh: $*" >&2
  pane_dump
  tmux kill-session -t "$session" 2>/dev/null || true
  rm -rf "$secrets"
  exit 1
}
status_args=(--name "$name")
server_up=no
for _ in $(seq 200); do
  if "$bin/autopoll" status "${status_args[@]}" >/dev/null 2>&1; then server_up=yes; break; fi
  tmux capture-pane -p -J -S - -t "$session.0" 2>/dev/null | grep -q 'autopoll-server exited' && break
  sleep 0.1
done
[ $server_up = yes ] || fail "the server did not start (its pane's output is below)"
poller_up=no
alive() {
  "$bin/autopoll" bridge status --db "$db" --conversation "$1" --json 2>/dev/null \
    | tr -d ' \n' | grep -q '"session":"b"[^}]*"alive":true'
}
for _ in $(seq 200); do
  all=yes
  for c in "${convs[@]}"; do alive "$c" || { all=no; break; }; done
  if [ $all = yes ]; then poller_up=yes; break; fi
  tmux capture-pane -p -J -S - -t "$session.1" 2>/dev/null | grep -q 'autopoll-poller exited' && break
  sleep 0.1
done
[ $poller_up = yes ] || fail "the poller did not start (its pane's output is below)"

echo "shard running in tmux session $session (server left, poller right)"
echo "attach:   tmux attach -t $session"
echo "status:   $bin/autopoll status --name $name --db $db"
if [ -n "$tokens_file" ]; then
  echo "serving:  ${#convs[@]} conversation(s) of $tokens_file (edit it to add or remove; the poller follows)"
  echo "ask:      AUTOPOLL_TOKEN=<coordinator token> $bin/autopoll bridge ask --db $db --conversation <ID> --session a \"your question\""
elif [ -n "$coordinator_token" ]; then
  echo "ask:      AUTOPOLL_TOKEN=$coordinator_token $bin/autopoll bridge ask --db $db --conversation $conv --session a \"your question\""
else
  echo "ask:      AUTOPOLL_TOKEN=<coordinator token> $bin/autopoll bridge ask --db $db --conversation $conv --session a \"your question\""
fi
echo "directly: $bin/autopoll ask --name $name \"your question\""
echo "stop:     tmux kill-session -t $session; rm -rf $secrets   (both get SIGHUP and stop cleanly)"
