#!/usr/bin/env bash
# A flood of made-up tokens against a valid user, side by side in one run:
# the database lookups the flood causes, and the valid user's GET /me
# latency alone and during the flood.
#
#   scripts/bench-abuse.sh      # RUNS=3 DURATION=8 USER_RATE=500 TOKENS=20000
#                               # FLOOD_RATE=2000 AUDIT_MODE=durable TOPOLOGY=split
#   NOX_SERVER_BIN=/tmp/nox-server-before scripts/bench-abuse.sh
#
# Per run, two phases, each on a fresh database at DATABASE_ADMIN_URL's
# server and a fresh release server with the default per-address limit (60
# a minute, burst 10) and in-flight cap; only the per-user limit is off
# (NOX_RATE_LIMIT_PER_USER=0), since 500 req/s is beyond its default of
# 600 a minute and this measures the flood, not the user's own limit. The
# valid user (tier `unlimited`, so no request quota either) sends GET /me
# with nox-load (open loop, USER_RATE req/s, DURATION s after a one-second
# warm-up):
#   baseline  alone;
#   flood     while a second nox-load sends FLOOD_RATE requests a second
#             from the same address (127.0.0.1), each with one of TOKENS
#             random well-formed tokens (`nox_` + 64 hex digits,
#             --random-bearer; each sent once unless DURATION + 2 s at
#             FLOOD_RATE needs more requests than TOKENS), from half a
#             second after the user starts (so the user's token is known to
#             the server, as an active user's is) until after the user's
#             last measured request.
# Token lookups: the scans of `api_tokens` in pg_stat_user_tables
# (seq_scan + idx_scan) over the server's life, read once it has stopped
# (its backends flush their statistics when they exit). A lookup is one
# `UPDATE api_tokens … WHERE token_hash = $1`, one scan, and nothing else
# reads that table while the server runs; the flood's figure is its phase's
# count minus the baseline's (the same set-up and user re-checks). Cross-check:
# every 401 the flood gets is one lookup (each token is sent once), every
# 429 none; and the audit trail must hold a row for each of them.
# "p99 ratio" is the user's p99 during the flood over its p99 alone; the
# server's CPU (% of one CPU) is measured over the user's load.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cpus.sh
source scripts/lib/build.sh
source scripts/lib/ticks.sh

RUNS=${RUNS:-3}
DURATION=${DURATION:-8}
USER_RATE=${USER_RATE:-500}
TOKENS=${TOKENS:-20000}
FLOOD_RATE=${FLOOD_RATE:-2000}
AUDIT_MODE=${AUDIT_MODE:-durable}
TOPOLOGY=${TOPOLOGY:-split}
ADMIN_URL=${DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=nox_bench_abuse
DB_URL=${ADMIN_URL%/*}/$DB
TOKEN=bench-admin-token-0123456789abcdef0123456789
PORT=${PORT:-8095}
RELEASE=${CARGO_TARGET_DIR:-target}/release
# The limits under test are the defaults.
unset NOX_RATE_LIMIT_PER_IP NOX_RATE_LIMIT_BURST_PER_IP NOX_MAX_INFLIGHT NOX_AUTH_CACHE_TTL_MS

build_load_tools
TOPOLOGY=$(usable_topology "$TOPOLOGY")

FLOOD_SECONDS=$(((TOKENS + FLOOD_RATE - 1) / FLOOD_RATE))
[ "$FLOOD_SECONDS" -ge $((DURATION + 2)) ] || FLOOD_SECONDS=$((DURATION + 2))
server="" user_pid="" data=""
start_server() {
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" 2>/dev/null
    data=$(mktemp -d)
    NOX_AUDIT_MODE=$AUDIT_MODE NOX_RATE_LIMIT_PER_USER=0 NOX_ADMIN_TOKEN=$TOKEN DATABASE_URL=$DB_URL \
        NOX_DATA_DIR=$data NOX_PORT=$PORT RUST_LOG=warn $(server_cpus "$TOPOLOGY") \
        "${NOX_SERVER_BIN:-$RELEASE/nox-server}" >/dev/null 2>&1 &
    server=$!
    for _ in $(seq 100); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 0.1; done
    user_token=$(curl -sf -X POST "localhost:$PORT/admin/users" -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: application/json' -d '{"name":"bench-user","tier":"unlimited"}' |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
    # One request first, so the token is known before the load's first
    # burst (whose concurrent requests would otherwise each be charged to
    # the address as an unknown token).
    curl -sf -o /dev/null -H "Authorization: Bearer $user_token" "localhost:$PORT/me"
}
# Stops the server and prints "<token lookups> <audit rows with status 401> <… 429>".
stop_server() {
    kill -TERM "$server"; wait "$server" || true; rm -rf "$data"
    for _ in $(seq 50); do
        [ "$(psql -tAq "$ADMIN_URL" -c "SELECT count(*) FROM pg_stat_activity WHERE datname = '$DB'")" = 0 ] && break
        sleep 0.1
    done
    psql -tAq "$DB_URL" -F ' ' -c "SELECT
        (SELECT seq_scan + coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'api_tokens'),
        (SELECT count(*) FROM audit_actions WHERE status_code = 401),
        (SELECT count(*) FROM audit_actions WHERE status_code = 429)"
}
trap 'kill -TERM $server $user_pid 2>/dev/null || true; restore_postgres; psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB" 2>/dev/null' EXIT
place_postgres "$TOPOLOGY"

# The valid user's load; prints nox-load's output, then the server's CPU
# meanwhile ("cpu <% of one CPU>").
user_load() {
    local ticks started
    ticks=$(ticks_of "$server") started=$(date +%s%N)
    $(client_cpus "$TOPOLOGY") "$RELEASE/nox-load" --rate "$USER_RATE" --seconds "$DURATION" --timeout 2 \
        --header "Authorization: Bearer $user_token" "http://127.0.0.1:$PORT/me"
    awk -v t=$(($(ticks_of "$server") - ticks)) -v hz="$(getconf CLK_TCK)" -v ns=$(($(date +%s%N) - started)) \
        'BEGIN {printf "cpu %.0f\n", 100 * t / hz / (ns / 1e9)}'
}
cpu_of() { awk '$1 == "cpu" {print $2}' <<<"$1"; }
p99_of() { sed -n '1s/.* p99 \([0-9.]*\) .*/\1/p' <<<"$1"; } # the 2xx answers' p99
answers_of() { awk -v s="$2" '$1 == "status" && $2 == s":" {n = $3} END {print n + 0}' <<<"$1"; }
non_2xx() { awk '$1 == "status" && $2 !~ /^2/ {n += $3} $1 == "unanswered:" {n += $2} END {print n + 0}' <<<"$1"; }
median() { sort -n | awk '{v[NR] = $1} END {if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}'; }

echo "topology: $TOPOLOGY, audit mode: $AUDIT_MODE; valid user GET /me at $USER_RATE req/s for $DURATION s;" \
    "flood: $TOKENS distinct tokens at $FLOOD_RATE req/s for $FLOOD_SECONDS s"
results=$(mktemp)
for run in $(seq "$RUNS"); do
    start_server
    alone=$(user_load)
    read -r base_lookups _ _ <<<"$(stop_server)"
    echo "run $run baseline: user $(head -1 <<<"$alone"); token lookups $base_lookups;" \
        "server CPU $(cpu_of "$alone") %"

    start_server
    user_load >"$results.user" &
    user_pid=$!
    sleep 0.5
    flood=$($(client_cpus "$TOPOLOGY") "$RELEASE/nox-load" --rate "$FLOOD_RATE" --seconds "$FLOOD_SECONDS" \
        --warmup 0 --timeout 2 --random-bearer "$TOKENS" "http://127.0.0.1:$PORT/me")
    wait "$user_pid"; user_pid=""
    during=$(cat "$results.user")
    read -r lookups audited_401 audited_429 <<<"$(stop_server)"
    sent=$(awk '$1 == "status" {n += $3} $1 == "unanswered:" {n += $2} END {print n + 0}' <<<"$flood")
    got_401=$(answers_of "$flood" 401) got_429=$(answers_of "$flood" 429)
    echo "run $run flood:    user $(head -1 <<<"$during"); token lookups $lookups;" \
        "server CPU $(cpu_of "$during") %"
    sed 's/^/    flood /' <<<"$flood"
    echo "    audit rows: 401 $audited_401 (flood got $got_401), 429 $audited_429 (flood got $got_429)"
    [ "$(non_2xx "$during")" = 0 ] || echo "    the valid user got $(non_2xx "$during") answers other than 2xx" >&2
    base_p99=$(p99_of "$alone") flood_p99=$(p99_of "$during")
    read -r per_100 ratio <<<"$(awk -v b="$base_p99" -v d="$flood_p99" -v l="$lookups" -v bl="$base_lookups" -v s="$sent" \
        'BEGIN {printf "%.3f %.2f", 100 * (l - bl) / s, d / b}')"
    echo "run $run: flood of $sent requests, $((lookups - base_lookups)) lookups beyond the baseline's:" \
        "$per_100 per 100 requests; user p99 $base_p99 ms alone, $flood_p99 ms during the flood: ratio $ratio"
    echo "$base_p99 $flood_p99 $ratio $per_100" >>"$results"
done
echo "== summary over $RUNS runs (medians)"
awk '{print $4}' "$results" | median | xargs printf 'token lookups per 100 flood requests: %s (target <= 1)\n'
printf 'valid user GET /me p99: alone %s ms, during the flood %s ms; ratio %s (target <= 2)\n' \
    "$(awk '{print $1}' "$results" | median)" "$(awk '{print $2}' "$results" | median)" "$(awk '{print $3}' "$results" | median)"
rm -f "$results" "$results.user"
