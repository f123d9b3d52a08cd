#!/usr/bin/env bash
# Audited GET /ls throughput and latency in each NOX_AUDIT_MODE, side by side
# in one run: the same release server, database server and load (wrk, one
# loopback client, bounded in time), once per mode, RUNS times each.
#
#   scripts/bench-audit-modes.sh            # RUNS=3 DURATION=8 CONNECTIONS="32 128"
#
# Needs a PostgreSQL at DATABASE_ADMIN_URL (default: postgres@127.0.0.1:5432),
# where it creates and drops the database nox_bench_modes.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
SECONDS_PER_RUN=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-"32 128"}
ADMIN_URL=${DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_URL=${ADMIN_URL%/*}/nox_bench_modes
TOKEN=bench-admin-token-0123456789abcdef0123456789
PORT=${PORT:-8099}

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release -q -p nox-server

run_mode() { # mode connections -> "rps p50 p99"
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_modes" -c "CREATE DATABASE nox_bench_modes" 2>/dev/null
    local data; data=$(mktemp -d)
    NOX_AUDIT_MODE=$1 NOX_RATE_LIMIT_PER_USER=0 NOX_RATE_LIMIT_PER_IP=0 NOX_ADMIN_TOKEN=$TOKEN DATABASE_URL=$DB_URL NOX_DATA_DIR=$data \
        NOX_PORT=$PORT RUST_LOG=warn ./target/release/nox-server >/dev/null 2>&1 &
    local server=$!
    for _ in $(seq 50); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 0.1; done
    curl -sf -X PUT "localhost:$PORT/write?path=a.txt" -H "Authorization: Bearer $TOKEN" --data-binary hello >/dev/null
    local out; out=$(wrk -t1 -c"$2" -d"${SECONDS_PER_RUN}s" --latency \
        -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/ls?path=.")
    kill -TERM "$server"; wait "$server" || true
    rm -rf "$data"
    local rps p50 p99
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    echo "$rps $p50 $p99"
}

for c in $CONNECTIONS; do
    for run in $(seq "$RUNS"); do
        for mode in off buffered durable; do
            read -r rps p50 p99 <<<"$(run_mode "$mode" "$c")"
            echo "connections=$c run=$run mode=$mode rps=$rps p50=$p50 p99=$p99"
        done
    done
done
psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_modes" 2>/dev/null
