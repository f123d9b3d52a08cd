#!/usr/bin/env bash
# /admin/audit/logs latency per filter and for a deep keyset page, against
# the same query's execution time in PostgreSQL (EXPLAIN ANALYZE); then
# /admin/audit/export rows/s and the server's peak RSS growth for CSV, gzip
# CSV and NDJSON, against psql's \copy of the same rows.
#
#   scripts/bench-audit-queries.sh     # ROWS=5000000 EXPORT_ROWS=1000000 RUNS=3 DURATION=5
#
# BIN_DIR=dir uses binaries already built there instead of building
# them in $CARGO_TARGET_DIR (default target/)/release.
#
# Seeds the database nox_bench_queries (at DATABASE_ADMIN_URL's server) with
# `nox-migrate seed` unless it already holds ROWS rows, and keeps it for the
# next run (KEEP_DB=0 drops it at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${ROWS:-5000000}
EXPORT_ROWS=${EXPORT_ROWS:-1000000}
RUNS=${RUNS:-3}
DURATION=${DURATION:-5}
KEEP_DB=${KEEP_DB:-1}
ADMIN_URL=${DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_URL=${ADMIN_URL%/*}/nox_bench_queries
TOKEN=bench-admin-token-0123456789abcdef0123456789
PORT=${PORT:-8097}

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
BIN_DIR=${BIN_DIR:-}
if [ -z "$BIN_DIR" ]; then cargo build --release -q --bins; BIN_DIR=${CARGO_TARGET_DIR:-target}/release; fi

rows=$(psql -tAq "$DB_URL" -c "SELECT count(*) FROM audit_actions" 2>/dev/null || echo 0)
if [ "$rows" -lt "$ROWS" ]; then
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_queries" -c "CREATE DATABASE nox_bench_queries" 2>/dev/null
    DATABASE_URL=$DB_URL RUST_LOG=warn $BIN_DIR/nox-migrate up >/dev/null
    DATABASE_URL=$DB_URL RUST_LOG=warn $BIN_DIR/nox-migrate seed --rows "$ROWS" | tail -1
    psql -q "$DB_URL" -c "VACUUM ANALYZE"
fi

data=$(mktemp -d)
# Audit off: each audited /logs call would add a row at the newest end,
# which every filter it does not match must then skip, so the figures would
# drift run after run. The audit's own cost is measured by the other scripts.
NOX_AUDIT_MODE=off NOX_RATE_LIMIT_PER_USER=0 NOX_RATE_LIMIT_PER_IP=0 NOX_ADMIN_TOKEN=$TOKEN DATABASE_URL=$DB_URL \
    NOX_DATA_DIR=$data NOX_PORT=$PORT RUST_LOG=warn $BIN_DIR/nox-server >/dev/null 2>&1 &
server=$!
cleanup() {
    kill -TERM $server 2>/dev/null; wait $server || true; rm -rf "$data"
    [ "$KEEP_DB" = 1 ] || psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS nox_bench_queries" 2>/dev/null
}
trap cleanup EXIT
for _ in $(seq 100); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 0.1; done

sql() { psql -tAq "$DB_URL" -c "$1"; }
user=$(sql "SELECT id FROM users WHERE name = 'seed-07'")
session=$(sql "SELECT session_id FROM audit_actions WHERE user_id = '$user'
               AND \"timestamp\" < now() - interval '45 days' ORDER BY \"timestamp\" DESC LIMIT 1")
request=$(sql "SELECT request_id FROM audit_actions WHERE \"timestamp\" < now() - interval '60 days' LIMIT 1")
day=$(sql "SELECT (now() - interval '45 days')::date")
read -r deep_micros deep_id <<<"$(sql "SELECT (extract(epoch FROM \"timestamp\") * 1000000)::bigint || ' ' || id
    FROM audit_actions ORDER BY \"timestamp\" DESC, id DESC OFFSET 1000000 LIMIT 1")"
cursor=$(printf '%s' "$deep_micros,$deep_id" | base64 -w0 | tr '+/' '-_' | tr -d '=')
like="ILIKE '%timed%'"

# name | query string | the WHERE clause the server builds for it
cases=(
    "newest page||TRUE"
    "user_id|user_id=$user|a.user_id = '$user'"
    "session_id|session_id=$session|a.session_id = '$session'"
    "request_id|request_id=$request|a.request_id = '$request'"
    "action_type|action_type=code_exec|a.action_type = 'code_exec'"
    "action_category|action_category=filesystem|a.action_category = 'filesystem'"
    "endpoint|endpoint=run|a.endpoint ILIKE '%run%'"
    "status_code|status_code=500|a.status_code = 500"
    "success|success=false|a.success = false"
    "quota_violation|quota_violation=true|a.quota_violation = true"
    "client_ip|client_ip=10.7.0.0/16|a.client_ip <<= '10.7.0.0/16'"
    "start+end_date|start_date=$day&end_date=$day|a.\"timestamp\" >= '$day' AND a.\"timestamp\" < '$day'::date + 1"
    "search|search=timed|(a.error_details $like OR a.command_text $like OR a.file_path $like OR a.metadata::text $like)"
    "deep keyset page|cursor=$cursor|(a.\"timestamp\", a.id) < (to_timestamp($deep_micros / 1000000.0), '$deep_id')"
)

lua=$(mktemp --suffix=.lua)
cat >"$lua" <<'EOF'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %.2f %.2f %.2f\n", summary.requests, summary.errors.status,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000))
end
EOF

echo "== /admin/audit/logs, page_size=50, one client, ${DURATION}s per case (ms) =="
printf "%-18s %4s %9s %8s %8s %8s %10s\n" case run requests p50 p95 p99 pg_exec
for run in $(seq "$RUNS"); do
    for case in "${cases[@]}"; do
        IFS='|' read -r name query where <<<"$case"
        out=$(wrk -t1 -c1 -d"${DURATION}s" -s "$lua" -H "Authorization: Bearer $TOKEN" \
            "http://127.0.0.1:$PORT/admin/audit/logs?page_size=50&$query" | grep RESULT)
        read -r _ requests errors p50 p95 p99 <<<"$out"
        [ "$errors" = 0 ] || echo "  $name: $errors non-2xx responses" >&2
        pg=$(sql "EXPLAIN (ANALYZE, FORMAT JSON) SELECT a.*, u.name AS user_name FROM audit_actions a
                  LEFT JOIN users u ON u.id = a.user_id WHERE $where
                  ORDER BY a.\"timestamp\" DESC, a.id DESC LIMIT 51" |
            python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)[0]["Execution Time"])')
        printf "%-18s %4s %9s %8s %8s %8s %10s\n" "$name" "$run" "$requests" "$p50" "$p95" "$p99" "$pg"
    done
done

status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

echo "== export of $EXPORT_ROWS rows, newest first =="
printf "%-10s %4s %10s %10s %12s %14s\n" format run seconds rows/s MiB_sent rss_growth_MiB
for run in $(seq "$RUNS"); do
    start=$(date +%s%N)
    psql -q "$DB_URL" -c "\\copy (SELECT * FROM audit_actions ORDER BY \"timestamp\" DESC, id DESC LIMIT $EXPORT_ROWS) TO '/dev/null' CSV HEADER"
    end=$(date +%s%N)
    secs=$(echo "scale=3; ($end - $start) / 1000000000" | bc)
    printf "%-10s %4s %10s %10.0f %12s %14s\n" "psql-copy" "$run" "$secs" "$(echo "$EXPORT_ROWS / $secs" | bc -l)" - -
    for variant in "csv|format=csv" "csv.gz|format=csv&compress=true" "ndjson|format=ndjson"; do
        IFS='|' read -r name query <<<"$variant"
        echo 5 >"/proc/$server/clear_refs" # resets the peak RSS (VmHWM) to the current RSS
        before=$(status_kib "$server" VmRSS)
        start=$(date +%s%N)
        bytes=$(curl -sf -o /dev/null -w '%{size_download}' -H "Authorization: Bearer $TOKEN" \
            "http://127.0.0.1:$PORT/admin/audit/export?$query&limit=$EXPORT_ROWS")
        end=$(date +%s%N)
        peak=$(status_kib "$server" VmHWM)
        secs=$(echo "scale=3; ($end - $start) / 1000000000" | bc)
        printf "%-10s %4s %10s %10.0f %12.1f %14.1f\n" "$name" "$run" "$secs" \
            "$(echo "$EXPORT_ROWS / $secs" | bc -l)" "$(echo "$bytes / 1048576" | bc -l)" \
            "$(echo "($peak - $before) / 1024" | bc -l)"
    done
done
echo "server idle RSS now: $(status_kib "$server" VmRSS) KiB"
rm -f "$lua"
