#!/usr/bin/env bash
# Audited GET /ls throughput and latency in each NOX_AUDIT_MODE, side by side
# in one run: the same release server, database server and load (wrk, one
# loopback client, bounded in time), once per mode, RUNS times each.
#
#   scripts/bench-audit-modes.sh            # RUNS=3 DURATION=8 CONNECTIONS="32 64 128"
#                                           # TOPOLOGIES="split shared"
#   NOX_SERVER_BIN=/tmp/nox-server-before scripts/bench-audit-modes.sh
#                                           # another build (A/B), no rebuild
#
# TOPOLOGIES: `split` gives the server CPU 0 to itself, and wrk and
# PostgreSQL the others (a CPU of their own each when there are three or
# more): what auditing costs the API server; `shared` lets all three
# compete for every CPU (see scripts/lib/cpus.sh).
#
# Each line also splits the CPU the machine spent per request between the
# server, PostgreSQL (its processes on this machine) and everything else
# (mostly wrk), and gives the daily rollups' largest lag seen (the status
# endpoint, read every 250 ms). The summary at the end gives, per topology,
# each mode's median req/s at each connection count and its ratio to
# `off`'s there, its peak (the best of those medians) and the peak's ratio
# to `off`'s peak.
#
# Needs a PostgreSQL at DATABASE_ADMIN_URL (default: postgres@127.0.0.1:5432),
# where it creates and drops the database nox_bench_modes.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib/cpus.sh
source scripts/lib/ticks.sh

RUNS=${RUNS:-3}
TOPOLOGIES=${TOPOLOGIES:-"split shared"}
SECONDS_PER_RUN=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-"32 64 128"}
ADMIN_URL=${DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_URL=${ADMIN_URL%/*}/nox_bench_modes
TOKEN=bench-admin-token-0123456789abcdef0123456789
PORT=${PORT:-8099}
RELEASE=${CARGO_TARGET_DIR:-target}/release

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
[ -n "${NOX_SERVER_BIN:-}" ] || cargo build --release -q -p nox-server


run_mode() { # topology mode connections -> "rps p50 p99 server_us postgres_us other_us"
    local topology=$1
    shift
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_modes" -c "CREATE DATABASE nox_bench_modes" 2>/dev/null
    local data; data=$(mktemp -d)
    NOX_AUDIT_MODE=$1 NOX_RATE_LIMIT_PER_USER=0 NOX_RATE_LIMIT_PER_IP=0 NOX_ADMIN_TOKEN=$TOKEN DATABASE_URL=$DB_URL NOX_DATA_DIR=$data \
        NOX_PORT=$PORT RUST_LOG=warn $(server_cpus "$topology") "${NOX_SERVER_BIN:-$RELEASE/nox-server}" >/dev/null 2>&1 &
    local server=$!
    for _ in $(seq 50); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 0.1; done
    curl -sf -X PUT "localhost:$PORT/write?path=a.txt" -H "Authorization: Bearer $TOKEN" --data-binary hello >/dev/null
    # The daily rollups' lag (GET /admin/audit/status), read every 250 ms.
    local lags poller=""; lags=$(mktemp)
    if [ "$1" != off ]; then
        (while sleep 0.25; do
            curl -sf "localhost:$PORT/admin/audit/status" -H "Authorization: Bearer $TOKEN" |
                sed -n 's/.*"lag_ms":\([0-9]*\).*/\1/p'
            echo # the body has no newline of its own
        done >"$lags") &
        poller=$!
    fi
    local server0 pg0 busy0
    server0=$(ticks_of "$server"); pg0=$(postgres_ticks); busy0=$(busy_ticks)
    local out; out=$($(client_cpus "$topology") wrk -t1 -c"$2" -d"${SECONDS_PER_RUN}s" --latency \
        -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/ls?path=.")
    [ -z "$poller" ] || kill "$poller" 2>/dev/null || true
    local lag; lag=$(sort -n "$lags" | tail -1); rm -f "$lags"
    local server_ticks=$(($(ticks_of "$server") - server0)) pg_ticks=$(($(postgres_ticks) - pg0))
    local busy=$(($(busy_ticks) - busy0))
    kill -TERM "$server"; wait "$server" || true
    rm -rf "$data"
    local rps p50 p99 requests
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    # CPU µs per request: the server, PostgreSQL, everything else (wrk).
    awk -v r="$requests" -v t="$TICK_US" -v s="$server_ticks" -v p="$pg_ticks" -v b="$busy" \
        -v rps="$rps" -v p50="$p50" -v p99="$p99" -v lag="${lag:--}" \
        'BEGIN {printf "%s %s %s %.1f %.1f %.1f %s\n", rps, p50, p99, s * t / r, p * t / r, (b - s - p) * t / r, lag}'
}

trap 'restore_postgres; psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_modes" 2>/dev/null' EXIT
results=$(mktemp)
: >"$results.medians"
for topology in $TOPOLOGIES; do
    if [ "$topology" = split ] && ! split_possible; then
        echo "topology=split skipped: this machine has one CPU"
        continue
    fi
    place_postgres "$topology"
    for c in $CONNECTIONS; do
        for run in $(seq "$RUNS"); do
            for mode in off buffered durable; do
                read -r rps p50 p99 server_us pg_us other_us lag <<<"$(run_mode "$topology" "$mode" "$c")"
                echo "topology=$topology connections=$c run=$run mode=$mode rps=$rps p50=$p50 p99=$p99" \
                    "cpu_us_per_request: server=$server_us postgres=$pg_us other=$other_us rollup_lag_max_ms=$lag"
                echo "$topology $mode $c $rps" >>"$results"
            done
        done
    done
done

echo "== summary: median req/s per connection count; peak = the best median"
for topology in $TOPOLOGIES; do
    for mode in off buffered durable; do
        line="topology=$topology mode=$mode"
        for c in $CONNECTIONS; do
            median=$(awk -v t="$topology" -v m="$mode" -v c="$c" '$1 == t && $2 == m && $3 == c {print $4}' "$results" |
                sort -n | awk '{v[NR] = $1} END {if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}')
            [ -n "$median" ] || continue
            line+=" c$c=$median"
            echo "$topology $mode $c $median" >>"$results.medians"
        done
        echo "$line"
    done
    awk -v t="$topology" '$1 == t {m[$2 " " $3] = $4; if ($2 == "off") c[++n] = $3}
        END {for (i = 1; i <= n; i++) if (m["off " c[i]])
            printf "topology=%s c%s: buffered %.2f of off, durable %.2f of off\n",
                t, c[i], m["buffered " c[i]] / m["off " c[i]], m["durable " c[i]] / m["off " c[i]]}' "$results.medians"
    awk -v t="$topology" '$1 == t {if ($4 > peak[$2]) peak[$2] = $4}
        END {if (peak["off"]) printf "topology=%s peak req/s: off %.0f, buffered %.0f (%.2f of off), durable %.0f (%.2f of off)\n",
            t, peak["off"], peak["buffered"], peak["buffered"] / peak["off"], peak["durable"], peak["durable"] / peak["off"]}' "$results.medians"
done
rm -f "$results" "$results.medians"
