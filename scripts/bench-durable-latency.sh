#!/usr/bin/env bash
# The durable mode's added latency at a constant rate of half the `off`
# peak, and the server's RSS idle and under load.
#
#   scripts/bench-durable-latency.sh      # RUNS=3 DURATION=8 STEADY_RATE=1500
#
# Per run: the `off` peak of GET /ls with wrk (64 connections), then
# nox-load (open loop: latency counted from each request's due time) at
# STEADY_RATE (1500 req/s, which durable sustains here) and at half the
# peak, against `off` and against `durable`, each on a fresh database at
# DATABASE_ADMIN_URL's server. RSS from /proc: after start-up
# (idle) and at the middle of the durable load.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DURATION=${DURATION:-8}
STEADY_RATE=${STEADY_RATE:-1500}
ADMIN_URL=${DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_URL=${ADMIN_URL%/*}/nox_bench_latency
TOKEN=bench-admin-token-0123456789abcdef0123456789
PORT=${PORT:-8096}
URL="http://127.0.0.1:$PORT/ls?path=."

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release -q -p nox-server -p nox-load

server=""
start_server() { # mode
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_latency" -c "CREATE DATABASE nox_bench_latency" 2>/dev/null
    data=$(mktemp -d)
    NOX_AUDIT_MODE=$1 NOX_RATE_LIMIT_PER_USER=0 NOX_RATE_LIMIT_PER_IP=0 NOX_ADMIN_TOKEN=$TOKEN DATABASE_URL=$DB_URL \
        NOX_DATA_DIR=$data NOX_PORT=$PORT RUST_LOG=warn ./target/release/nox-server >/dev/null 2>&1 &
    server=$!
    for _ in $(seq 100); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 0.1; done
    curl -sf -X PUT "localhost:$PORT/write?path=a.txt" -H "Authorization: Bearer $TOKEN" --data-binary hello >/dev/null
}
stop_server() {
    kill -TERM "$server"; wait "$server" || true; rm -rf "$data"
}
trap 'kill -TERM $server 2>/dev/null || true; psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_latency" 2>/dev/null' EXIT
rss_mib() { awk '$1 == "VmRSS:" {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

# Open-loop load; requests unanswered after 2 s count as errors, so an
# overloaded run ends soon after its DURATION.
load() { # rate
    ./target/release/nox-load --rate "$1" --seconds "$DURATION" --timeout 2 \
        --header "Authorization: Bearer $TOKEN" "$URL"
}

for run in $(seq "$RUNS"); do
    start_server off
    peak=$(wrk -t1 -c64 -d"${DURATION}s" -H "Authorization: Bearer $TOKEN" "$URL" | awk '/Requests\/sec/ {printf "%d", $2}')
    rate=$((peak / 2))
    off_steady=$(load "$STEADY_RATE")
    off=$(load "$rate")
    stop_server
    start_server durable
    sleep 1
    idle=$(rss_mib "$server")
    durable_steady=$(load "$STEADY_RATE")
    load "$rate" >/tmp/nox-load-durable.$$ &
    loader=$!
    sleep $((DURATION / 2))
    loaded=$(rss_mib "$server")
    wait "$loader"
    durable=$(cat /tmp/nox-load-durable.$$); rm -f /tmp/nox-load-durable.$$
    stop_server
    echo "run $run: off peak $peak req/s"
    echo "  off     $off_steady"
    echo "  durable $durable_steady"
    echo "  off     $off"
    echo "  durable $durable"
    echo "  server RSS: idle $idle MiB, under durable load at $rate req/s $loaded MiB"
done
