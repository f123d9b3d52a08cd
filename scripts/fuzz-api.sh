#!/usr/bin/env bash
# API fuzzing: schemathesis against a live nox-server's own /openapi.json,
# once with a user's token and once with an admin's, then the audit trail is
# held to account for every request it sent. Fails when
#   - any response is >= 500, or its status, content type or body is not as
#     the OpenAPI document says (schemathesis' checks);
#   - a fuzzed request does not have exactly one audit_actions row (matched
#     by the X-Request-ID of its response; scripts/fuzz/check_audit.py);
#   - the server does not stop cleanly on SIGTERM, or leaves anything in its
#     audit spool;
#   - `nox-migrate verify` (hash chains, checkpoints) or
#     `nox-migrate summaries check` (daily rollups) fails afterwards.
#
# Called by .ci/run after the tests; runs on its own too (root or not):
#   scripts/fuzz-api.sh
# Settings: NOX_FUZZ_MAX_EXAMPLES (cases per operation and phase, default 50:
# about a minute for both runs), NOX_FUZZ_SEED (schemathesis' seed, default
# fixed so that CI is repeatable; `random` for a fresh one, printed), and
# NOX_FUZZ_KEEP=1 (keep the work directory: server log, reports, database).
# It uses the debug build in ${CARGO_TARGET_DIR:-target} (CI has built most of
# it for the tests already) and a virtualenv with a pinned schemathesis in
# ${CARGO_TARGET_DIR:-target}/fuzz-venv. The server gets its own embedded
# PostgreSQL in a fresh directory under /tmp, never the machine's.
#
# Not fuzzed, and why:
#   - In the admin run, the fuzzing admin's own user id and token ids are
#     never sent to DELETE /admin/tokens/{id}, PATCH /admin/users/{id} or
#     PUT /quotas/admin/users/{id}/quotas (scripts/fuzz/nox_fuzz_hooks.py):
#     revoking its own token, demoting or deactivating itself (possible once
#     the fuzzer has created a second admin) or giving itself a tiny quota
#     would turn the rest of the run into 401s and 429s. Those operations are
#     fuzzed with every other id, real ones included.
#   - Rate limits are off (NOX_RATE_LIMIT_PER_USER/_PER_IP=0) and the fuzz
#     user's tier is unlimited, or most of the run would be 429s; the
#     limits have their own tests (tests/it/limits.rs, quotas.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
SCHEMATHESIS_VERSION=4.32.5
MAX_EXAMPLES=${NOX_FUZZ_MAX_EXAMPLES:-50}
SEED=${NOX_FUZZ_SEED:-20261207}
[[ $SEED != random ]] || SEED=$(od -An -tu4 -N4 /dev/urandom | tr -d ' ')
SKIP_PATHS=/health,/metrics
CHECKS=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
START=$SECONDS

step() { printf '%s  [%3ds]\n' "-- $*" $((SECONDS - START)); }

step "building the debug binaries"
cargo build --bins --locked --quiet
BIN=$TARGET_DIR/debug

VENV=$TARGET_DIR/fuzz-venv
if [[ ! -x $VENV/bin/st ]] || [[ $("$VENV/bin/st" --version 2>/dev/null) != *" $SCHEMATHESIS_VERSION" ]]; then
    step "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        # Debian's python3 needs python3-venv for `-m venv`.
        rm -rf "$VENV"
        if [[ $(id -u) == 0 ]]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        fi
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

# The work directory: the data directory's ancestors must be traversable by
# the user the embedded PostgreSQL runs as when we are root.
WORK=$(mktemp -d /tmp/nox-fuzz.XXXXXX)
chmod 755 "$WORK"
DATA=$WORK/data
SERVER_PID=
CLUSTER_UP=

pg_tool() {
    local dir
    if command -v "$1" >/dev/null; then command -v "$1"; return; fi
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    echo "$dir/$1"
}

# Runs a PostgreSQL server tool as the cluster's owner.
as_cluster_owner() {
    local owner
    owner=$(stat -c %U "$DATA/pg")
    if [[ $(id -u) == 0 && $owner != root ]]; then
        runuser -u "$owner" -- env HOME=/ "$@"
    else
        "$@"
    fi
}

cleanup() {
    local status=$?
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ -n $CLUSTER_UP ]]; then
        as_cluster_owner "$(pg_tool pg_ctl)" stop --pgdata "$DATA/pg" --mode fast --wait --silent || true
    fi
    if [[ $status != 0 && -f $WORK/server.log ]]; then
        echo "-- the server's log ends:"
        tail -n 40 "$WORK/server.log" || true
    fi
    if [[ ${NOX_FUZZ_KEEP:-} == 1 || $status != 0 ]]; then
        echo "-- kept $WORK (server.log, reports/)"
    else
        rm -rf "$WORK"
    fi
    exit $status
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ADMIN_TOKEN=nox-fuzz-admin-$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
BASE=http://127.0.0.1:$PORT

step "starting nox-server on $BASE (data in $DATA)"
env -u DATABASE_URL \
    NOX_DATA_DIR="$DATA" NOX_BIND_ADDR=127.0.0.1 NOX_PORT="$PORT" \
    NOX_ADMIN_TOKEN="$ADMIN_TOKEN" NOX_AUDIT_MODE=durable NOX_AUDIT_SKIP_PATHS="$SKIP_PATHS" \
    NOX_RATE_LIMIT_PER_USER=0 NOX_RATE_LIMIT_PER_IP=0 NOX_LOG_FORMAT=text \
    RUST_LOG="${RUST_LOG:-info}" \
    "$BIN/nox-server" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 120); do
    curl -fsS "$BASE/health" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "nox-server exited at start-up"; exit 1; }
    sleep 0.5
done
curl -fsS "$BASE/health" >/dev/null

# Set-up requests carry this User-Agent, so the audit check can tell them apart.
api() {
    local method=$1 path=$2 token=$3
    shift 3
    curl -fsS -X "$method" -A nox-fuzz-setup/1 -H "Authorization: Bearer $token" "$@" "$BASE$path"
}
json_field() { python3 -c "import json, sys; print(json.load(sys.stdin)$1)"; }

ADMIN_ID=$(api GET /me "$ADMIN_TOKEN" | json_field '["id"]')
ADMIN_TOKEN_IDS=$(api GET "/admin/users/$ADMIN_ID/tokens" "$ADMIN_TOKEN" | python3 -c '
import json, sys
body = json.load(sys.stdin)
tokens = body["tokens"] if isinstance(body, dict) else body
print(",".join(t["id"] for t in tokens))')
USER_TOKEN=$(api POST /admin/users "$ADMIN_TOKEN" -H 'Content-Type: application/json' \
    -d '{"name":"fuzz-user","tier":"unlimited"}' | json_field '["token"]')

mkdir -p "$WORK/reports"
# The live stream is left out: a valid request never ends (its parameters
# are the /logs filters, fuzzed there; tests/it/audit_stream.rs covers it).
st_run() {
    local name=$1 token=$2
    shift 2
    (cd "$WORK" && PYTHONDONTWRITEBYTECODE=1 timeout 900 "$VENV/bin/st" run "$BASE/openapi.json" \
        -H "Authorization: Bearer $token" \
        --checks "$CHECKS" \
        --phases examples,coverage,fuzzing,stateful \
        --max-examples "$MAX_EXAMPLES" \
        --seed "$SEED" \
        --generation-database none \
        --request-timeout 60 \
        --exclude-path /admin/audit/stream \
        --no-color \
        --report har --report-har-path "$WORK/reports/$name.har.json" \
        "$@")
}

failed=0
step "schemathesis as a user (max $MAX_EXAMPLES examples per operation and phase, seed $SEED)"
st_run user "$USER_TOKEN" >"$WORK/reports/user.log" 2>&1 || failed=1
sed -n '/^=* SUMMARY =*$/,$p' "$WORK/reports/user.log"
[[ $failed == 0 ]] || { echo "-- the user run failed:"; cat "$WORK/reports/user.log"; }

step "schemathesis as an admin"
admin_failed=0
NOX_FUZZ_PROTECTED_IDS="$ADMIN_ID,$ADMIN_TOKEN_IDS" \
    SCHEMATHESIS_HOOKS=nox_fuzz_hooks PYTHONPATH="$ROOT/scripts/fuzz" \
    st_run admin "$ADMIN_TOKEN" >"$WORK/reports/admin.log" 2>&1 || admin_failed=1
# (The summary is followed by the hooks' count of ids they replaced.)
sed -n '/^=* SUMMARY =*$/,$p' "$WORK/reports/admin.log"
[[ $admin_failed == 0 ]] || { failed=1; echo "-- the admin run failed:"; cat "$WORK/reports/admin.log"; }

# The admin is still an admin with a working token (the hooks' purpose).
api GET /me "$ADMIN_TOKEN" | json_field '["role"]' | grep -qx admin ||
    { echo "the fuzzing admin lost its token or its role"; failed=1; }

# Errors are for reading (a 500 already failed a check); actix's own
# "request parse error" lines are schemathesis' probes with malformed headers,
# refused before the app sees them.
grep -E ' ERROR ' "$WORK/server.log" >"$WORK/errors.log" || true
if [[ -s $WORK/errors.log ]]; then
    echo "-- the server logged $(wc -l <"$WORK/errors.log") errors, the first:"
    head -n 10 "$WORK/errors.log"
fi

step "stopping the server (SIGTERM)"
kill -TERM "$SERVER_PID"
server_status=0
wait "$SERVER_PID" || server_status=$?
SERVER_PID=
if [[ $server_status != 0 ]]; then
    echo "nox-server exited with $server_status after SIGTERM"
    failed=1
fi

spooled=$(find "$DATA/audit-spool" -name '*.ndjson' 2>/dev/null | wc -l)
echo "  audit spool: $spooled *.ndjson files"
[[ $spooled == 0 ]] || failed=1

step "one audit row per fuzzed request"
as_cluster_owner "$(pg_tool pg_ctl)" start --pgdata "$DATA/pg" --log "$DATA/pg/fuzz-check.log" \
    --wait --silent
CLUSTER_UP=1
# The embedded cluster wants its password (kept beside it, never printed).
PGPASSWORD=$(<"$DATA/pg.password") "$(pg_tool psql)" --host "$DATA/pg" --username nox \
    --dbname nox --no-psqlrc --quiet --csv \
    --command "SELECT request_id, http_method, coalesce(metadata->>'raw_endpoint', endpoint) AS endpoint,
                      user_agent FROM audit_actions" \
    >"$WORK/audit-rows.csv"
as_cluster_owner "$(pg_tool pg_ctl)" stop --pgdata "$DATA/pg" --mode fast --wait --silent
CLUSTER_UP=
"$VENV/bin/python" "$ROOT/scripts/fuzz/check_audit.py" "$WORK/audit-rows.csv" "$SKIP_PATHS" \
    "$WORK/reports/user.har.json" "$WORK/reports/admin.har.json" || failed=1

step "nox-migrate verify; nox-migrate summaries check"
migrate() { env -u DATABASE_URL NOX_DATA_DIR="$DATA" RUST_LOG=warn "$BIN/nox-migrate" "$@"; }
migrate verify 2>&1 | tail -n 5 || failed=1
migrate summaries check 2>&1 | tail -n 5 || failed=1

if [[ $failed != 0 ]]; then
    step "API fuzzing FAILED"
    exit 1
fi
step "API fuzzing passed"
