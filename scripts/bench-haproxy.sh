#!/usr/bin/env bash
# Throughput of one server against three behind HAProxy (deploy/haproxy.cfg),
# durable GET /ls, in the same run: one server alone, the same server behind
# HAProxy (the balancer's own cost), and three servers behind it. On a
# two-core machine the three servers, HAProxy, PostgreSQL and wrk share two
# CPUs: read the ratios as overhead, not scaling.
#
#   scripts/bench-haproxy.sh      # RUNS=3 DURATION=8 CONNECTIONS=64
#
# Uses the PostgreSQL at DATABASE_ADMIN_URL (a fresh database per run) and
# Debian's haproxy and wrk (installed when missing, as root).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/build.sh
source scripts/lib/haproxy.sh

RUNS=${RUNS:-3}
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-64}
ADMIN_URL=${DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_URL=${ADMIN_URL%/*}/nox_bench_haproxy
TOKEN=bench-admin-token-0123456789abcdef0123456789
RELEASE=${CARGO_TARGET_DIR:-target}/release
PORTS=(8101 8102 8103)
LB_PORT=8100

for tool in wrk haproxy; do
    command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$tool" >/dev/null; }
done
systemctl stop haproxy 2>/dev/null || true
build_load_tools
cargo build --release -q -p nox-migrate
WORK=$(mktemp -d)
servers=() balancer=""
stop_all() {
    [[ -z $balancer ]] || { kill "$balancer" 2>/dev/null || true; wait "$balancer" 2>/dev/null || true; }
    for pid in "${servers[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${servers[@]}"; do wait "$pid" 2>/dev/null || true; done
    servers=() balancer=""
}
trap 'stop_all; rm -rf "$WORK"; psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_haproxy" 2>/dev/null' EXIT

start_servers() { # count
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_haproxy" -c "CREATE DATABASE nox_bench_haproxy" 2>/dev/null
    DATABASE_URL=$DB_URL NOX_DATA_DIR=$WORK/migrate "$RELEASE/nox-migrate" up >/dev/null
    for i in $(seq 0 $(($1 - 1))); do
        NOX_AUDIT_MODE=durable NOX_RATE_LIMIT_PER_USER=0 NOX_RATE_LIMIT_PER_IP=0 NOX_ADMIN_TOKEN=$TOKEN \
            DATABASE_URL=$DB_URL NOX_DATA_DIR=$WORK/server$i NOX_SANDBOX_DIR=$WORK/sandboxes \
            NOX_PORT=${PORTS[$i]} RUST_LOG=warn "$RELEASE/nox-server" --no-migrate >/dev/null 2>&1 &
        servers+=($!)
        for _ in $(seq 100); do curl -sf "http://127.0.0.1:${PORTS[$i]}/health" >/dev/null && break; sleep 0.1; done
    done
    curl -sf -X PUT "http://127.0.0.1:${PORTS[0]}/write?path=a.txt" -H "Authorization: Bearer $TOKEN" --data-binary hello >/dev/null
}
start_balancer() { # port1 port2 port3
    haproxy_config "$LB_PORT" "$@" >"$WORK/haproxy.cfg"
    haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
    balancer=$!
    sleep 3 # through `rise 2` health checks
}
rps() { # port
    wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$1/ls?path=." |
        awk '/Requests\/sec/ {printf "%d", $2}'
}

for run in $(seq "$RUNS"); do
    start_servers 1
    alone=$(rps "${PORTS[0]}")
    start_balancer "${PORTS[0]}" "${PORTS[0]}" "${PORTS[0]}"
    behind=$(rps "$LB_PORT")
    stop_all
    start_servers 3
    start_balancer "${PORTS[@]}"
    three=$(rps "$LB_PORT")
    stop_all
    echo "run $run: one server $alone req/s; behind HAProxy $behind ($(awk -v a="$behind" -v b="$alone" 'BEGIN {printf "%.2f", a / b}')); three behind HAProxy $three ($(awk -v a="$three" -v b="$alone" 'BEGIN {printf "%.2f", a / b}'))"
done
