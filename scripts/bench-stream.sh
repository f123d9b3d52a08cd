#!/usr/bin/env bash
# What live audit streams cost a busy server: audited (durable) GET /ls
# throughput and the server's RSS with no stream open, side by side with
# 100 idle subscribers (a filter nothing matches) and 10 following the
# whole trail, in the same run; and how soon a committed record reaches a
# follower.
#
#   scripts/bench-stream.sh      # RUNS=3 DURATION=8 IDLE=100 FOLLOWING=10
#
# Per run, on a fresh database at DATABASE_ADMIN_URL's server: wrk (64
# connections) with no stream, then the same with the streams open. RSS
# from /proc in the middle of each load. Latency: during the loaded case a
# probe makes a request every 100 ms as its own user and times, on a
# stream filtered to that user, each record's arrival after its response
# (durable: the response follows the commit).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/build.sh

RUNS=${RUNS:-3}
DURATION=${DURATION:-8}
IDLE=${IDLE:-100}
FOLLOWING=${FOLLOWING:-10}
ADMIN_URL=${DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_URL=${ADMIN_URL%/*}/nox_bench_stream
TOKEN=bench-admin-token-0123456789abcdef0123456789
PORT=${PORT:-8097}
BASE="http://127.0.0.1:$PORT"
RELEASE=${CARGO_TARGET_DIR:-target}/release

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
build_load_tools

server="" streams=()
start_server() {
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_stream" -c "CREATE DATABASE nox_bench_stream" 2>/dev/null
    data=$(mktemp -d)
    NOX_AUDIT_MODE=durable NOX_RATE_LIMIT_PER_USER=0 NOX_RATE_LIMIT_PER_IP=0 NOX_ADMIN_TOKEN=$TOKEN \
        DATABASE_URL=$DB_URL NOX_DATA_DIR=$data NOX_PORT=$PORT RUST_LOG=warn \
        "$RELEASE/nox-server" >/dev/null 2>&1 &
    server=$!
    for _ in $(seq 100); do curl -sf "$BASE/health" >/dev/null && break; sleep 0.1; done
    curl -sf -X PUT "$BASE/write?path=a.txt" -H "Authorization: Bearer $TOKEN" --data-binary hello >/dev/null
}
stop_streams() {
    for pid in "${streams[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${streams[@]}"; do wait "$pid" 2>/dev/null || true; done
    streams=()
}
stop_server() {
    stop_streams
    kill -TERM "$server"; wait "$server" || true; rm -rf "$data"
}
trap 'stop_streams; kill -TERM $server 2>/dev/null || true; psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_stream" 2>/dev/null' EXIT
rss_mib() { awk '$1 == "VmRSS:" {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
open_stream() { # query
    curl -sN -o /dev/null -H "Authorization: Bearer $TOKEN" "$BASE/admin/audit/stream?$1" &
    streams+=($!)
}
loaded() { # prints "req/s rss"
    wrk -t1 -c64 -d"${DURATION}s" -H "Authorization: Bearer $TOKEN" "$BASE/ls?path=." >"/tmp/nox-bench-stream.$$" &
    local wrk_pid=$!
    sleep $((DURATION / 2))
    local rss
    rss=$(rss_mib "$server")
    wait "$wrk_pid"
    echo "$(awk '/Requests\/sec/ {printf "%d", $2}' "/tmp/nox-bench-stream.$$") $rss"
    rm -f "/tmp/nox-bench-stream.$$"
}

for run in $(seq "$RUNS"); do
    start_server
    read -r none_rps none_rss <<<"$(loaded)"
    for _ in $(seq "$IDLE"); do open_stream "user_id=$(cat /proc/sys/kernel/random/uuid)"; done
    for _ in $(seq "$FOLLOWING"); do open_stream ""; done
    sleep 1
    open=$(curl -sf -H "Authorization: Bearer $TOKEN" "$BASE/admin/audit/status" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["streams_open"])')
    python3 scripts/bench/stream_latency.py "$BASE" "$TOKEN" "$DURATION" >"/tmp/nox-bench-latency.$$" &
    probe=$!
    read -r with_rps with_rss <<<"$(loaded)"
    wait "$probe"
    stop_server
    echo "run $run: none $none_rps req/s, RSS $none_rss MiB; with $open streams $with_rps req/s, RSS $with_rss MiB;" \
        "ratio $(awk -v a="$with_rps" -v b="$none_rps" 'BEGIN {printf "%.2f", a / b}')"
    echo "  $(cat "/tmp/nox-bench-latency.$$")"
    rm -f "/tmp/nox-bench-latency.$$"
done
