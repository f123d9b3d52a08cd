#!/usr/bin/env bash
# POST /run with `true` against spawning `bash -c true` directly, side by
# side in one run: sequential requests (one at a time), medians of RUNS runs.
#
#   scripts/bench-run-overhead.sh            # RUNS=3 COUNT=200
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
COUNT=${COUNT:-200}
ADMIN_URL=${DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_URL=${ADMIN_URL%/*}/nox_bench_run
TOKEN=bench-admin-token-0123456789abcdef0123456789
PORT=${PORT:-8098}
RELEASE=${CARGO_TARGET_DIR:-target}/release

cargo build --release -q --bins
psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_run" -c "CREATE DATABASE nox_bench_run" 2>/dev/null
data=$(mktemp -d); chmod 755 "$data"
NOX_RATE_LIMIT_PER_USER=0 NOX_RATE_LIMIT_PER_IP=0 NOX_ADMIN_TOKEN=$TOKEN DATABASE_URL=$DB_URL NOX_DATA_DIR=$data NOX_PORT=$PORT RUST_LOG=warn \
    "$RELEASE/nox-server" >/dev/null 2>&1 &
server=$!
trap 'kill -TERM $server; wait $server || true; rm -rf "$data"; psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_run" 2>/dev/null' EXIT
for _ in $(seq 50); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 0.1; done

per_call_ms() { # command... -> milliseconds per call over COUNT calls
    local start end
    start=$(date +%s%N)
    for _ in $(seq "$COUNT"); do "$@" >/dev/null; done
    end=$(date +%s%N)
    echo "scale=3; ($end - $start) / $COUNT / 1000000" | bc
}
for run in $(seq "$RUNS"); do
    direct=$(per_call_ms bash -c true)
    api=$(per_call_ms curl -sf -X POST "localhost:$PORT/run" -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: application/json' -d '{"command":"true"}')
    curl_only=$(per_call_ms curl -sf "localhost:$PORT/health")
    echo "run=$run direct_bash_ms=$direct run_endpoint_ms=$api curl_health_ms=$curl_only"
done
