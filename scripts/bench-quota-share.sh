#!/usr/bin/env bash
# The per-request cost of the request quota shared across servers (leases
# in PostgreSQL) against the in-memory count, side by side in one run.
#
#   scripts/bench-quota-share.sh     # RUNS=3 DURATION=8 CONNECTIONS=32
#                                    # AUDIT_MODE=off TOPOLOGY=split
#   NOX_SERVER_BIN=/tmp/nox-server-before scripts/bench-quota-share.sh
#
# Per run, two phases, each on a fresh database at DATABASE_ADMIN_URL's
# server and a fresh release server (rate limits off), wrk sending
# GET /ls?path=. (one file; no database work of its own: GET /me reads the
# user's row) with CONNECTIONS connections for DURATION s, as one user:
#   memory  a user of tier `unlimited`: no hour or day limit, so requests
#           are counted in memory and flushed as deltas each second (what
#           every user's requests cost before leases);
#   leased  a user whose hour and day limits are far away (10^12): each
#           request spends a unit of the server's lease, and a lease of 64
#           (the largest block) is one `quota_lease` statement.
# AUDIT_MODE defaults to `off` so that the quota check is not hidden behind
# the audit trail's own cost (the quota work is the same in every mode).
# Reported per phase: req/s, the server's and PostgreSQL's CPU per request
# (µs; PostgreSQL: every process of the local `postgres` user, and apart
# the backends connected to the benchmark's database, which leaves out
# other databases' work on a shared server and the WAL writer), and, read
# once the server has stopped (its backends flush their statistics when they
# exit), the `quota_lease` calls (pg_stat_user_functions, track_functions
# set on the database) and the rows written to `quota_usage` (inserts and
# updates: leases, given-back units, deltas), per 1,000 requests. The
# summary gives the medians and the leased/memory ratio of req/s.
# TOPOLOGY as in scripts/lib/cpus.sh (`split`: the server alone on CPU 0).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cpus.sh
source scripts/lib/build.sh
source scripts/lib/ticks.sh

RUNS=${RUNS:-3}
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-32}
AUDIT_MODE=${AUDIT_MODE:-off}
TOPOLOGY=${TOPOLOGY:-split}
ADMIN_URL=${DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=nox_bench_quota_share
DB_URL=${ADMIN_URL%/*}/$DB
TOKEN=bench-admin-token-0123456789abcdef0123456789
PORT=${PORT:-8093}
RELEASE=${CARGO_TARGET_DIR:-target}/release

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
build_load_tools
TOPOLOGY=$(usable_topology "$TOPOLOGY")

# "pid ticks" of each backend connected to the benchmark's database: its
# PostgreSQL CPU apart from other databases' (other work on a shared server)
# and from the WAL writer's.
backend_ticks() {
    local pid
    for pid in $(psql -tAq "$ADMIN_URL" -c "SELECT pid FROM pg_stat_activity WHERE datname = '$DB'"); do
        echo "$pid $(ticks_of "$pid")"
    done
}
admin() { # method path [json]
    curl -sf -X "$1" "localhost:$PORT$2" -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: application/json' ${3:+-d "$3"}
}
field() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }

server="" data=""
start_server() {
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" 2>/dev/null
    psql -q "$ADMIN_URL" -c "ALTER DATABASE $DB SET track_functions = 'pl'"
    data=$(mktemp -d)
    NOX_AUDIT_MODE=$AUDIT_MODE NOX_RATE_LIMIT_PER_USER=0 NOX_RATE_LIMIT_PER_IP=0 NOX_ADMIN_TOKEN=$TOKEN \
        DATABASE_URL=$DB_URL NOX_DATA_DIR=$data NOX_PORT=$PORT RUST_LOG=warn $(server_cpus "$TOPOLOGY") \
        "${NOX_SERVER_BIN:-$RELEASE/nox-server}" >/dev/null 2>&1 &
    server=$!
    for _ in $(seq 100); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 0.1; done
}
# Stops the server; prints "<quota_lease calls> <quota_usage rows written>".
stop_server() {
    kill -TERM "$server"; wait "$server" || true; server=""; rm -rf "$data"
    for _ in $(seq 50); do
        [ "$(psql -tAq "$ADMIN_URL" -c "SELECT count(*) FROM pg_stat_activity WHERE datname = '$DB'")" = 0 ] && break
        sleep 0.1
    done
    psql -tAq "$DB_URL" -F ' ' -c "SELECT
        (SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE funcname = 'quota_lease'),
        (SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables WHERE relname = 'quota_usage')"
}
trap '[ -z "$server" ] || kill -TERM $server 2>/dev/null || true; restore_postgres; psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB" 2>/dev/null' EXIT
place_postgres "$TOPOLOGY"

# One phase: prints "rps server_us postgres_us backends_us leases_per_1000 writes_per_1000".
phase() { # memory|leased
    start_server
    local user token
    if [ "$1" = memory ]; then
        user=$(admin POST /admin/users '{"name":"bench-memory","tier":"unlimited"}')
    else
        user=$(admin POST /admin/users '{"name":"bench-leased","tier":"standard"}')
        admin PUT "/quotas/admin/users/$(field id <<<"$user")/quotas" \
            '{"req_hour":1000000000000,"req_day":1000000000000}' >/dev/null
    fi
    token=$(field token <<<"$user")
    curl -sf -o /dev/null -X PUT -H "Authorization: Bearer $token" --data-binary hello "localhost:$PORT/write?path=a.txt"
    local server0 pg0 backends0 out
    server0=$(ticks_of "$server") pg0=$(postgres_ticks) backends0=$(backend_ticks)
    out=$($(client_cpus "$TOPOLOGY") wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" \
        -H "Authorization: Bearer $token" "http://127.0.0.1:$PORT/ls?path=.")
    local server_ticks=$(($(ticks_of "$server") - server0)) pg_ticks=$(($(postgres_ticks) - pg0))
    # Backends opened during the load count from zero.
    local own_ticks
    own_ticks=$(awk 'NR == FNR {start[$1] = $2; next} {total += $2 - start[$1]} END {print total + 0}' \
        <(echo "$backends0") <(backend_ticks))
    local leases writes
    read -r leases writes <<<"$(stop_server)"
    local rps requests non2xx
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    [ -z "$non2xx" ] || echo "    $1: $non2xx answers other than 2xx" >&2
    awk -v r="$requests" -v t="$TICK_US" -v s="$server_ticks" -v p="$pg_ticks" -v o="$own_ticks" -v rps="$rps" \
        -v l="$leases" -v w="$writes" \
        'BEGIN {printf "%s %.1f %.1f %.1f %.2f %.2f\n", rps, s * t / r, p * t / r, o * t / r, 1000 * l / r, 1000 * w / r}'
}

echo "topology: $TOPOLOGY, audit mode: $AUDIT_MODE; GET /ls with wrk, $CONNECTIONS connections, $DURATION s per phase"
results=$(mktemp)
for run in $(seq "$RUNS"); do
    for kind in memory leased; do
        read -r rps server_us pg_us own_us leases writes <<<"$(phase "$kind")"
        echo "run $run $kind: $rps req/s; CPU per request: server $server_us µs, PostgreSQL $pg_us µs" \
            "(the database's backends $own_us µs); per 1,000 requests: $leases lease statements," \
            "$writes quota_usage rows written"
        echo "$kind $rps $server_us $pg_us $own_us $leases $writes" >>"$results"
    done
done
median() { sort -n | awk '{v[NR] = $1} END {if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}'; }
column_median() { awk -v k="$1" -v c="$2" '$1 == k {print $c}' "$results" | median; }
echo "== summary over $RUNS runs (medians)"
for kind in memory leased; do
    printf '%s: %s req/s; CPU per request: server %s µs, PostgreSQL %s µs (backends %s µs); per 1,000 requests: %s lease statements, %s rows written\n' \
        "$kind" "$(column_median "$kind" 2)" "$(column_median "$kind" 3)" "$(column_median "$kind" 4)" \
        "$(column_median "$kind" 5)" "$(column_median "$kind" 6)" "$(column_median "$kind" 7)"
done
awk -v m="$(column_median memory 2)" -v l="$(column_median leased 2)" \
    'BEGIN {printf "leased/memory req/s: %.3f\n", l / m}'
rm -f "$results"
