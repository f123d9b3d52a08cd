#!/usr/bin/env bash
# deploy/haproxy.cfg in front of three nox-servers on one PostgreSQL, under
# a short mixed load (scripts/haproxy/mixed_load.py: writes, reads through
# the next server, listings, runs, audit searches). Fails when
#   - HAProxy refuses the configuration, or a server does not become
#     healthy behind it;
#   - any request fails, or a file written through one server does not read
#     back through another (the servers share NOX_SANDBOX_DIR);
#   - a server got no share of the load;
#   - a server stopped (SIGTERM) during the second round of load costs a
#     single request;
#   - a request lacks its one audit row, or `nox-migrate verify` or
#     `summaries check` fails afterwards.
#
# Called by .ci/run; runs on its own too: scripts/haproxy-smoke.sh
# (SECONDS_PER_ROUND=8, WORKERS=6). It installs Debian's haproxy when
# missing (root), uses the debug build in ${CARGO_TARGET_DIR:-target}, and
# starts its own PostgreSQL cluster from the system binaries under /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/haproxy.sh
ROOT=$PWD
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
ROUND=${SECONDS_PER_ROUND:-8}
WORKERS=${WORKERS:-6}
START=$SECONDS
step() { printf '%s  [%3ds]\n' "-- $*" $((SECONDS - START)); }

if ! command -v haproxy >/dev/null; then
    step "installing haproxy"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq haproxy >/dev/null
    # Debian starts its own instance with its own configuration: not ours.
    systemctl stop haproxy 2>/dev/null || true
fi
step "building the debug binaries"
cargo build --bins --locked --quiet
BIN=$TARGET_DIR/debug
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)

WORK=$(mktemp -d /tmp/nox-haproxy.XXXXXX)
chmod 755 "$WORK"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PG_PORT=$(free_port)
LB_PORT=$(free_port)
PIDS=()
as_pg_owner() {
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}
cleanup() {
    local status=$?
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    as_pg_owner "$PG_BIN/pg_ctl" stop -D "$WORK/pg" -m fast -w >/dev/null 2>&1 || true
    if [[ $status != 0 ]]; then
        for log in "$WORK"/*.log "$WORK"/pglog/*.log; do echo "-- $log ends:"; tail -n 20 "$log"; done
        echo "-- kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit $status
}
trap cleanup EXIT

step "starting PostgreSQL on 127.0.0.1:$PG_PORT"
mkdir "$WORK/pg" "$WORK/pglog"
[[ $(id -u) != 0 ]] || chown postgres "$WORK/pg" "$WORK/pglog"
as_pg_owner "$PG_BIN/initdb" -D "$WORK/pg" -U postgres --auth=trust >"$WORK/initdb.log"
as_pg_owner "$PG_BIN/pg_ctl" start -D "$WORK/pg" -w -l "$WORK/pglog/postgres.log" \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $WORK/pg -c max_connections=200 -c fsync=off" >/dev/null
export DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres
psql() { command psql -X -q -v ON_ERROR_STOP=1 "$DATABASE_URL" "$@"; }

step "nox-migrate up (once, for every server)"
NOX_DATA_DIR=$WORK/migrate "$BIN/nox-migrate" up >"$WORK/migrate.log" 2>&1

ADMIN_TOKEN=nox-haproxy-admin-$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
mkdir -p "$WORK/sandboxes"
SERVER_PORTS=()
for i in 1 2 3; do
    port=$(free_port)
    SERVER_PORTS+=("$port")
    # What deploy/nox@.service shares: the database, the workspaces, the
    # signing key; the balancer is the trusted proxy. Each worker runs one
    # command at a time, so a run slot per worker keeps the servers' 429
    # (2 x cores slots) out of a load that must see only successes, even when
    # round robin stacks every worker's run on one of the two left running.
    NOX_DATA_DIR=$WORK/server$i NOX_PORT=$port NOX_BIND_ADDR=127.0.0.1 \
        NOX_SANDBOX_DIR=$WORK/sandboxes NOX_AUDIT_SIGNING_KEY_FILE=$WORK/audit-signing.key \
        NOX_TRUSTED_PROXIES=127.0.0.1/32 NOX_ADMIN_TOKEN=$ADMIN_TOKEN NOX_AUDIT_MODE=durable \
        NOX_RATE_LIMIT_PER_USER=0 NOX_RATE_LIMIT_PER_IP=0 NOX_LOG_FORMAT=text RUST_LOG=warn \
        NOX_RUN_MAX_CONCURRENT=$WORKERS \
        "$BIN/nox-server" --no-migrate >"$WORK/server$i.log" 2>&1 &
    PIDS+=($!)
    # The first creates the signing key and the admin; the others find them.
    for _ in $(seq 1 120); do
        curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        sleep 0.5
    done
done

step "haproxy with deploy/haproxy.cfg on :$LB_PORT (servers ${SERVER_PORTS[*]})"
haproxy_config "$LB_PORT" "${SERVER_PORTS[@]}" >"$WORK/haproxy.cfg"
haproxy -c -q -f "$WORK/haproxy.cfg"
haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
PIDS+=($!)
BASE=http://127.0.0.1:$LB_PORT
for _ in $(seq 1 60); do
    curl -fsS "$BASE/health" >/dev/null 2>&1 && break
    sleep 0.5
done
sleep 3 # every server through its `rise 2` checks

requests_served() { # port: the server's own count of answered requests
    curl -fsS "http://127.0.0.1:$1/metrics" |
        awk '/^nox_http_requests_total/ && !/route="\/health"/ && !/route="\/metrics"/ {n += $NF} END {printf "%d", n}'
}

step "round 1: $WORKERS workers for ${ROUND}s through the balancer"
python3 scripts/haproxy/mixed_load.py "$BASE" "$ADMIN_TOKEN" "$ROUND" "$WORKERS" "$WORK/ids-1.txt"
for i in 0 1 2; do
    served=$(requests_served "${SERVER_PORTS[$i]}")
    echo "   server $((i + 1)) answered $served requests"
    [[ $served -gt 0 ]] || { echo "server $((i + 1)) got no share of the load"; exit 1; }
done

step "round 2: the same, with server 2 stopped (SIGTERM) midway"
python3 scripts/haproxy/mixed_load.py "$BASE" "$ADMIN_TOKEN" "$ROUND" "$WORKERS" "$WORK/ids-2.txt" &
load=$!
sleep $((ROUND / 2))
kill -TERM "${PIDS[1]}"
wait "${PIDS[1]}" || { echo "server 2 did not stop cleanly"; exit 1; }
wait "$load"

step "every request has exactly one audit row"
for pid in "${PIDS[0]}" "${PIDS[2]}"; do kill -TERM "$pid"; wait "$pid"; done
cat "$WORK"/ids-*.txt | grep -v '^$' | sort -u >"$WORK/ids.txt"
psql -c "CREATE TEMP TABLE sent (request_id uuid)" \
    -c "\\copy sent FROM '$WORK/ids.txt'" \
    -c "\\copy (SELECT s.request_id, count(a.request_id) FROM sent s LEFT JOIN audit_actions a USING (request_id) GROUP BY 1 HAVING count(a.request_id) <> 1) TO '$WORK/bad-ids.txt'"
if [[ -s $WORK/bad-ids.txt ]]; then
    echo "requests without exactly one audit row (id, rows):"
    head "$WORK/bad-ids.txt"
    exit 1
fi
echo "   $(wc -l <"$WORK/ids.txt") requests, one row each"

step "nox-migrate verify and summaries check"
NOX_DATA_DIR=$WORK/migrate "$BIN/nox-migrate" verify --public-key "$WORK/server1/checkpoints/public-key"
NOX_DATA_DIR=$WORK/migrate "$BIN/nox-migrate" summaries check
step "passed"
