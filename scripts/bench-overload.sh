#!/usr/bin/env bash
# Open-loop load at three times the `off` peak against the in-flight cap
# (NOX_MAX_INFLIGHT): how fast shed requests (503) are answered, what is
# still served, the server's RSS growth, an audit row per shed request; and,
# as the same run's baseline, what a shed request costs against a served
# one when the server keeps up.
#
#   scripts/bench-overload.sh     # RUNS=3 DURATION=8 OVERLOAD=3
#                                 # MODES="off durable" CAPS="64 default" TOPOLOGY=split
#   NOX_SERVER_BIN=/tmp/nox-server-before scripts/bench-overload.sh
#
# Per run, each measurement on a fresh database and server, GET /ls:
#   peak       the `off` peak with wrk (64 connections, as in
#              scripts/bench-durable-latency.sh);
#   half peak  nox-load at half that peak: audit off, nothing shed (served);
#              audit off with NOX_MAX_INFLIGHT=1 and the one slot held by a
#              slow upload, so that every request is shed (shed); the same
#              with audit durable (a 503 waits for its audit row like any
#              other response in durable mode). Server CPU per answer
#              compares a 503 with a served request;
#   overload   for each audit mode in MODES and each cap in CAPS (`default`:
#              NOX_MAX_INFLIGHT unset, so the server's own, 256 per CPU it
#              may use: 256 on its one CPU in the split layout), nox-load at
#              OVERLOAD times the peak from twice as many keep-alive
#              connections as the cap. nox-load keeps one request in flight
#              per connection, so with fewer connections than the cap
#              nothing would be shed (the excess would wait inside the
#              generator); with twice as many, up to half of what is in
#              flight is beyond the cap.
# nox-load runs DURATION s and counts every request (no warm-up), so each
# 503 answered in an audited mode must have its audit row; latency counts
# from each request's due time; a request unanswered after 2 s is an error;
# the generator keeps sending until every request has left, so an overload
# run lasts until its backlog is served. Also reported: how busy the
# server's CPU was (when it is saturated the excess waits in socket buffers
# and in the generator, in front of the server, where no in-flight cap sees
# it), and its RSS: VmRSS before the load and the peak during it (VmHWM,
# reset just before the load). TOPOLOGY as in scripts/lib/cpus.sh (`split`:
# the server alone on CPU 0).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cpus.sh
source scripts/lib/build.sh
source scripts/lib/ticks.sh

RUNS=${RUNS:-3}
DURATION=${DURATION:-8}
OVERLOAD=${OVERLOAD:-3}
MODES=${MODES:-"off durable"}
CAPS=${CAPS:-"64 default"}
TOPOLOGY=${TOPOLOGY:-split}
ADMIN_URL=${DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=nox_bench_overload
DB_URL=${ADMIN_URL%/*}/$DB
TOKEN=bench-admin-token-0123456789abcdef0123456789
PORT=${PORT:-8094}
URL="http://127.0.0.1:$PORT/ls?path=."
RELEASE=${CARGO_TARGET_DIR:-target}/release
unset NOX_MAX_INFLIGHT

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
build_load_tools
TOPOLOGY=$(usable_topology "$TOPOLOGY")
# The server's default cap (nox-api's MAX_INFLIGHT_PER_CORE per CPU it may use).
if [ "$TOPOLOGY" = split ]; then default_cap=256; else default_cap=$((256 * ${#USABLE_CPUS[@]})); fi

server="" data="" holder=""
start_server() { # mode cap
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" 2>/dev/null
    data=$(mktemp -d)
    local cap=()
    [ "$2" = default ] || cap=("NOX_MAX_INFLIGHT=$2")
    env "${cap[@]}" NOX_AUDIT_MODE="$1" NOX_RATE_LIMIT_PER_USER=0 NOX_RATE_LIMIT_PER_IP=0 NOX_ADMIN_TOKEN=$TOKEN \
        DATABASE_URL=$DB_URL NOX_DATA_DIR=$data NOX_PORT=$PORT RUST_LOG=warn $(server_cpus "$TOPOLOGY") \
        "${NOX_SERVER_BIN:-$RELEASE/nox-server}" >/dev/null 2>&1 &
    server=$!
    for _ in $(seq 100); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 0.1; done
    curl -sf -X PUT "localhost:$PORT/write?path=a.txt" -H "Authorization: Bearer $TOKEN" --data-binary hello >/dev/null
}
stop_server() {
    if [ -n "$holder" ]; then kill "$holder" 2>/dev/null || true; wait "$holder" || true; holder=""; fi
    kill -TERM "$server"; wait "$server" || true; rm -rf "$data" "$data.body"
}
# With NOX_MAX_INFLIGHT=1: an upload trickling in (1 MB at 1 KiB/s) holds
# the only slot, so every other request is shed.
hold_the_slot() {
    head -c 1000000 /dev/zero >"$data.body"
    curl -s -o /dev/null --limit-rate 1k -X PUT -H "Authorization: Bearer $TOKEN" \
        --data-binary @"$data.body" "localhost:$PORT/write?path=slow.bin" &
    holder=$!
    sleep 0.5
    local status
    status=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "$URL")
    [ "$status" = 503 ] || { echo "the slot is not held (GET /ls answered $status)" >&2; exit 1; }
}
trap 'kill -TERM $server $holder 2>/dev/null || true; restore_postgres; psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB" 2>/dev/null' EXIT
place_postgres "$TOPOLOGY"

TICKS_PER_SECOND=$(getconf CLK_TCK)
status_mib() { awk -v k="$2:" '$1 == k {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
# nox-load against the running server; sets `out` (its output), `busy` (%
# of one CPU the server used meanwhile), `us_per_answer` (its CPU per
# answer), `before` and `high` (RSS before and at the peak, MiB).
load() { # rate connections
    before=$(status_mib "$server" VmRSS)
    echo 5 >"/proc/$server/clear_refs" # resets VmHWM to the current RSS
    local ticks started
    ticks=$(ticks_of "$server") started=$(date +%s%N)
    out=$($(client_cpus "$TOPOLOGY") "$RELEASE/nox-load" --rate "$1" --seconds "$DURATION" --warmup 0 \
        --timeout 2 --connections "$2" --header "Authorization: Bearer $TOKEN" "$URL")
    ticks=$(($(ticks_of "$server") - ticks))
    high=$(status_mib "$server" VmHWM)
    read -r busy us_per_answer <<<"$(awk -v t="$ticks" -v hz="$TICKS_PER_SECOND" -v ns=$(($(date +%s%N) - started)) \
        -v n="$(awk '$1 == "status" {n += $3} END {print n + 0}' <<<"$out")" \
        'BEGIN {printf "%.0f %.1f", 100 * t / hz / (ns / 1e9), n ? 1e6 * t / hz / n : 0}')"
}
# From nox-load's output: a status's answers, p50 and p99 ("0 - -" when none).
status_figures() { # status
    awk -v s="$1:" '$1 == "status" && $2 == s {for (i = 1; i < NF; i++) {if ($i == "p50") p50 = $(i + 1); if ($i == "p99") p99 = $(i + 1)}; n = $3}
        END {if (n) print n, p50, p99; else print "0 - -"}' <<<"$out"
}
audit_rows_503() { psql -tAq "$DB_URL" -c "SELECT count(*) FROM audit_actions WHERE status_code = 503"; }

results=$(mktemp)
echo "topology: $TOPOLOGY; default cap: $default_cap"
for run in $(seq "$RUNS"); do
    start_server off default
    peak=$($(client_cpus "$TOPOLOGY") wrk -t1 -c64 -d"${DURATION}s" -H "Authorization: Bearer $TOKEN" "$URL" |
        awk '/Requests\/sec/ {printf "%d", $2}')
    stop_server
    half=$((peak / 2))
    rate=$(awk -v p="$peak" -v o="$OVERLOAD" 'BEGIN {printf "%d", p * o}')
    echo "run $run: off peak $peak req/s (wrk, 64 connections)"

    start_server off default
    load "$half" 64
    stop_server
    read -r n p50 p99 <<<"$(status_figures 200)"
    echo "  at $half req/s, audit off, served: $n answered 200, p50 $p50 p99 $p99 ms; server $us_per_answer µs of CPU per answer ($busy % busy)"
    echo "served $p99 $us_per_answer" >>"$results"
    for mode in off durable; do
        start_server "$mode" 1
        hold_the_slot
        load "$half" 64
        audited=-
        [ "$mode" = off ] || audited=$(audit_rows_503)
        stop_server
        read -r n p50 p99 <<<"$(status_figures 503)"
        echo "  at $half req/s, audit $mode, shed: $n answered 503, p50 $p50 p99 $p99 ms; server $us_per_answer µs of CPU" \
            "per answer ($busy % busy); audit rows with 503: $audited"
        echo "shed-$mode $p99 $us_per_answer" >>"$results"
    done

    echo "  overload: $rate req/s ($OVERLOAD × the peak)"
    for mode in $MODES; do
        for cap in $CAPS; do
            connections=$((2 * ${cap/default/$default_cap}))
            start_server "$mode" "$cap"
            sleep 0.5
            load "$rate" "$connections"
            audited=-
            [ "$mode" = off ] || audited=$(audit_rows_503)
            stop_server
            read -r shed _ shed_p99 <<<"$(status_figures 503)"
            growth=$(awk -v b="$before" -v h="$high" 'BEGIN {printf "%.1f", h - b}')
            echo "  mode=$mode cap=$cap connections=$connections: $(head -1 <<<"$out")"
            sed -n 's/^status /    status /p; s/^unanswered/    unanswered/p' <<<"$out"
            echo "    server CPU $busy % busy; RSS $before MiB before, peak $high MiB: growth $growth MiB;" \
                "audit rows with 503: $audited"
            ok_rate=$(sed -n '1s/.*achieved \([0-9]*\) req\/s.*/\1/p' <<<"$out")
            echo "overload-$mode-cap-$cap $shed_p99 $ok_rate $shed $growth" >>"$results"
        done
    done
done

# Medians over the runs of each column; "-" (no such answer) counts as none.
median_of() { # key column
    awk -v k="$1" -v c="$2" '$1 == k && $c != "-" {print $c}' "$results" | sort -n |
        awk '{v[NR] = $1} END {if (!NR) print "-"; else print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}'
}
echo "== summary: medians over $RUNS runs (targets: 503 p99 < 5 ms, RSS growth < 64 MiB at $OVERLOAD × the peak)"
echo "half the peak, audit off: served p99 $(median_of served 2) ms, $(median_of served 3) µs of server CPU per request;" \
    "shed p99 $(median_of shed-off 2) ms, $(median_of shed-off 3) µs per 503"
echo "half the peak, audit durable: shed p99 $(median_of shed-durable 2) ms, $(median_of shed-durable 3) µs per 503"
for mode in $MODES; do
    for cap in $CAPS; do
        key=overload-$mode-cap-$cap
        echo "$OVERLOAD × the peak, mode=$mode cap=$cap: 503 p99 $(median_of "$key" 2) ms ($(median_of "$key" 4) answered)," \
            "2xx $(median_of "$key" 3) req/s, RSS growth $(median_of "$key" 5) MiB"
    done
done
rm -f "$results"
