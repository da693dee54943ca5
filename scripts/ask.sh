#!/bin/sh
# Ask a running autopoll-server a question from any shell.
#
#   scripts/ask.sh [--name NAME] [--runtime-dir DIR] [--timeout SECS] [QUESTION...]
#   echo "question" | scripts/ask.sh
#
# POSIX sh only, with mkfifo, printf, cat and sed (plus rm, sleep and id for
# clean-up, the timeout and the default runtime dir); no jq, no python. It
# speaks the FIFO protocol of docs/PROTOCOL.md: a private FIFO pair in the
# server's clients/ directory, one hello on the shared FIFO, one ask frame.
# Exit codes as `autopoll ask`: 0 answered, 5 timed out, 9 empty question,
# 10 no server, 1 other errors, 2 usage.
set -u

usage() {
    sed -n '2,5p' "$0" | sed -e 's/^#   /  /' -e 's/^# \{0,1\}//'
}

name=${AUTOPOLL_NAME:-default}
runtime=${AUTOPOLL_RUNTIME_DIR:-}
timeout=30
while [ $# -gt 0 ]; do
    case $1 in
        --name) [ $# -ge 2 ] || { usage >&2; exit 2; }; name=$2; shift 2 ;;
        --name=*) name=${1#--name=}; shift ;;
        --runtime-dir) [ $# -ge 2 ] || { usage >&2; exit 2; }; runtime=$2; shift 2 ;;
        --runtime-dir=*) runtime=${1#--runtime-dir=}; shift ;;
        --timeout) [ $# -ge 2 ] || { usage >&2; exit 2; }; timeout=$2; shift 2 ;;
        --timeout=*) timeout=${1#--timeout=}; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) echo "ask.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) break ;;
    esac
done
case $timeout in
    ''|*[!0-9]*) echo "ask.sh: --timeout takes whole seconds, not '$timeout'" >&2; exit 2 ;;
esac
if [ -z "$runtime" ]; then
    if [ -n "${XDG_RUNTIME_DIR:-}" ]; then runtime=$XDG_RUNTIME_DIR/autopoll; else runtime=/tmp/autopoll-$(id -u); fi
fi
dir=$runtime/$name

no_server() {
    echo "ask.sh: no server \`$name\` running at $dir: $1; start one with \`autopoll-server --name $name\`" >&2
    exit 10
}
[ -p "$dir/requests" ] || no_server "its request FIFO does not exist"
pid=$(cat "$dir/pid" 2>/dev/null) || pid=
[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || no_server "its process is gone"

if [ $# -gt 0 ]; then question=$*; else question=$(cat); fi
[ -n "$question" ] || { echo "ask.sh: the question is empty" >&2; exit 9; }

# JSON string escaping: backslash, quote, tab, CR, newlines; drop other control bytes.
tab=$(printf '\t'); cr=$(printf '\r')
escaped=$(printf '%s\n' "$question" | sed -e ':a' -e '$!N' -e '$!ba' \
    -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e "s/$tab/\\\\t/g" -e "s/$cr/\\\\r/g" -e 's/\n/\\n/g' \
    -e 's/[[:cntrl:]]//g')

req=$dir/clients/sh-$$.req
rep=$dir/clients/sh-$$.rep
timer=
cleanup() {
    rm -f "$req" "$rep"
    [ -n "$timer" ] && kill "$timer" 2>/dev/null
}
trap cleanup EXIT
trap 'echo "ask.sh: no answer within ${timeout}s (is the server hung or overloaded?)" >&2; exit 5' USR1
trap 'exit 130' INT TERM
mkfifo -m 600 "$req" "$rep" || exit 1
# The timer signals us at the deadline; cancelled, it takes its sleep with it.
(
    trap 'kill "$sp" 2>/dev/null; exit 0' TERM
    sleep "$timeout" & sp=$!
    wait "$sp" && kill -USR1 $$ 2>/dev/null
) </dev/null >/dev/null 2>&1 &
timer=$!

# Read-write opens never block, whether or not the server is there yet.
exec 4<>"$rep"
exec 3<>"$dir/requests"
printf '{"type":"hello","version":1,"client":"ask.sh","request_fifo":"%s","reply_fifo":"%s"}\n' "$req" "$rep" >&3
exec 3>&-
IFS= read -r welcome <&4 || exit 1
case $welcome in
    *'"type":"welcome"'*) ;;
    *) echo "ask.sh: the server refused the connection: $welcome" >&2; exit 1 ;;
esac
exec 5<>"$req"
rm -f "$req" "$rep"  # both sides hold descriptors now; the names are not needed
printf '{"type":"ask","id":1,"question":"%s","timeout_ms":%s000}\n' "$escaped" "$timeout" >&5
IFS= read -r reply <&4 || exit 1
exec 5>&-

# Decode: hide escaped backslashes and quotes, cut fields, restore.
bs=$(printf '\001'); qt=$(printf '\002')
plain=$(printf '%s\n' "$reply" | sed -e "s/\\\\\\\\/$bs/g" -e "s/\\\\\"/$qt/g")
field() {
    printf '%s\n' "$plain" | sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p" | sed -e 's/\\n/\
/g' -e "s/\\\\t/$tab/g" -e "s/$qt/\"/g" -e "s/$bs/\\\\/g"
}
case $plain in
    *'"type":"answer"'*)
        field answer
        sources=$(printf '%s\n' "$plain" | sed -n 's/.*"sources":\[\([^]]*\)\].*/\1/p')
        if [ -n "$sources" ]; then
            printf '\nsources:\n'
            printf '%s\n' "$sources" | sed -e 's/^"//' -e 's/"$//' -e 's/","/\
/g' | sed 's/^/  /'
        fi
        exit 0 ;;
    *'"type":"error"'*)
        code=$(field code)
        echo "ask.sh: server error ($code): $(field message)" >&2
        case $code in timeout) exit 5 ;; too_large|invalid|bad_frame) exit 9 ;; *) exit 1 ;; esac ;;
    *)
        echo "ask.sh: unexpected reply: $reply" >&2
        exit 1 ;;
esac
