#!/usr/bin/env bash
# The latency durable mode adds at constant rates up to half the `off`
# peak, and the server's RSS idle and under load.
#
#   scripts/bench-durable-latency.sh      # RUNS=3 DURATION=8 STEADY_RATE=1500
#                                         # FRACTIONS="0.25 0.5" TOPOLOGY=split
#   NOX_SERVER_BIN=/tmp/nox-server-before scripts/bench-durable-latency.sh
#
# Per run: the `off` peak of GET /ls with wrk (64 connections), then
# nox-load (open loop: latency counted from each request's due time, after
# a one-second warm-up) at STEADY_RATE and at each FRACTION of that peak,
# against `off` and against `durable`, each on a fresh database at
# DATABASE_ADMIN_URL's server; "p99 added" is durable's p99 minus off's at
# the same rate. TOPOLOGY `split` (default) gives the server CPU 0 to
# itself and the load generator and PostgreSQL the others (a CPU of their
# own each when there are three or more); `shared` does not place anything
# (scripts/lib/cpus.sh). RSS from /proc: after start-up
# (idle) and in the middle of the durable load at the highest rate. CPU per
# request: the server's and PostgreSQL's (all its processes) over the load.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cpus.sh
source scripts/lib/build.sh
source scripts/lib/ticks.sh

RUNS=${RUNS:-3}
DURATION=${DURATION:-8}
STEADY_RATE=${STEADY_RATE:-1500}
FRACTIONS=${FRACTIONS:-"0.25 0.5"}
TOPOLOGY=${TOPOLOGY:-split}
ADMIN_URL=${DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_URL=${ADMIN_URL%/*}/nox_bench_latency
TOKEN=bench-admin-token-0123456789abcdef0123456789
PORT=${PORT:-8096}
URL="http://127.0.0.1:$PORT/ls?path=."
RELEASE=${CARGO_TARGET_DIR:-target}/release

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
build_load_tools
TOPOLOGY=$(usable_topology "$TOPOLOGY")

server=""
start_server() { # mode
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_latency" -c "CREATE DATABASE nox_bench_latency" 2>/dev/null
    data=$(mktemp -d)
    NOX_AUDIT_MODE=$1 NOX_RATE_LIMIT_PER_USER=0 NOX_RATE_LIMIT_PER_IP=0 NOX_ADMIN_TOKEN=$TOKEN DATABASE_URL=$DB_URL \
        NOX_DATA_DIR=$data NOX_PORT=$PORT RUST_LOG=warn $(server_cpus "$TOPOLOGY") \
        "${NOX_SERVER_BIN:-$RELEASE/nox-server}" >/dev/null 2>&1 &
    server=$!
    for _ in $(seq 100); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 0.1; done
    curl -sf -X PUT "localhost:$PORT/write?path=a.txt" -H "Authorization: Bearer $TOKEN" --data-binary hello >/dev/null
}
stop_server() {
    kill -TERM "$server"; wait "$server" || true; rm -rf "$data"
}
loader=""
trap 'kill -TERM $server $loader 2>/dev/null || true; restore_postgres; psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_latency" 2>/dev/null' EXIT
place_postgres "$TOPOLOGY"
rss_mib() { awk '$1 == "VmRSS:" {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

# Open-loop load; requests unanswered after 2 s count as errors, so an
# overloaded run ends soon after its DURATION.
load() { # rate
    $(client_cpus "$TOPOLOGY") "$RELEASE/nox-load" --rate "$1" --seconds "$DURATION" --timeout 2 \
        --header "Authorization: Bearer $TOKEN" "$URL"
}
p99_of() { sed -n '1s/.* p99 \([0-9.]*\) .*/\1/p' <<<"$1"; } # the 2xx answers'; empty when none
# The load, then the CPU the server and PostgreSQL spent per request sent
# meanwhile (warm-up included: nox-load sends rate x (1 + DURATION)).
measured_load() { # rate
    local server0 pg0
    server0=$(ticks_of "$server"); pg0=$(postgres_ticks)
    load "$1"
    awk -v r=$(($1 * (DURATION + 1))) -v t="$TICK_US" \
        -v s=$(($(ticks_of "$server") - server0)) -v p=$(($(postgres_ticks) - pg0)) \
        'BEGIN {printf "CPU per request: server %.0f us, PostgreSQL %.0f us, both %.0f us\n", s * t / r, p * t / r, (s + p) * t / r}'
}
cpu_of() { grep '^CPU per request' <<<"$1"; }

echo "topology: $TOPOLOGY"
for run in $(seq "$RUNS"); do
    start_server off
    peak=$($(client_cpus "$TOPOLOGY") wrk -t1 -c64 -d"${DURATION}s" -H "Authorization: Bearer $TOKEN" "$URL" |
        awk '/Requests\/sec/ {printf "%d", $2}')
    stop_server
    rates="$STEADY_RATE"
    for fraction in $FRACTIONS; do rates+=" $(awk -v p="$peak" -v f="$fraction" 'BEGIN {printf "%d", p * f}')"; done
    echo "run $run: off peak $peak req/s (wrk, 64 connections)"
    highest=${rates##* } # the last fraction's rate: RSS under load is read there
    for rate in $rates; do
        start_server off
        off=$(measured_load "$rate")
        stop_server
        start_server durable
        sleep 1
        idle=$(rss_mib "$server")
        measured_load "$rate" >"/tmp/nox-load-durable.$$" &
        loader=$!
        sleep $((DURATION / 2 + 1))
        loaded=$(rss_mib "$server")
        wait "$loader"
        durable=$(cat "/tmp/nox-load-durable.$$"); rm -f "/tmp/nox-load-durable.$$"
        stop_server
        echo "  off     $(head -1 <<<"$off")"
        echo "          $(cpu_of "$off")"
        echo "  durable $(head -1 <<<"$durable")"
        echo "          $(cpu_of "$durable")"
        awk -v r="$rate" -v d="$(p99_of "$durable")" -v o="$(p99_of "$off")" \
            'BEGIN {if (d == "" || o == "") printf "  at %d req/s: no p99 (nothing answered)\n", r
                    else printf "  at %d req/s: p99 added by durable %.2f ms\n", r, d - o}'
        if [ "$rate" = "$highest" ]; then
            echo "  server RSS: idle $idle MiB, under durable load at $rate req/s $loaded MiB"
        fi
    done
done
