#!/usr/bin/env bash
# The whole benchmark suite, as `just bench` runs it (this script needs no
# `just`): a release build, the micro-benchmarks and ingest (`cargo bench`),
# then each load script. Every step prints its figures beside the baseline
# measured in the same run; the wall time of each step is listed at the end.
#
#   scripts/bench.sh        # DATABASE_ADMIN_URL=postgres://postgres@127.0.0.1:5432/postgres
#                           # CARGO_TARGET_DIR=target
set -euo pipefail
cd "$(dirname "$0")/.."

timings=()
step() { # name command...
    local name=$1 started=$SECONDS
    shift
    echo "== $name"
    "$@"
    timings+=("$(printf '%5d s  %s' $((SECONDS - started)) "$name")")
}

step "release build" cargo build --release --bins
step "cargo bench (ingest, durable writers, hot paths, encoding)" cargo bench --workspace --bench '*'
step "audit modes, server on its own CPU" env DURATION=4 TOPOLOGIES=split scripts/bench-audit-modes.sh
step "audit modes, shared CPUs" env DURATION=4 RUNS=2 TOPOLOGIES=shared scripts/bench-audit-modes.sh
step "durable latency and RSS" env DURATION=3 scripts/bench-durable-latency.sh
step "token flood against a valid user" scripts/bench-abuse.sh
step "3x overload: shedding and RSS" env DURATION=4 RUNS=1 CAPS=default scripts/bench-overload.sh
step "/run overhead" scripts/bench-run-overhead.sh
step "live streams: 100 idle, 10 following" env DURATION=4 RUNS=1 scripts/bench-stream.sh
step "quota leases against in-memory counting" env DURATION=4 RUNS=1 scripts/bench-quota-share.sh
step "one server against three behind HAProxy" env DURATION=4 RUNS=1 scripts/bench-haproxy.sh
step "/logs and export on 5M rows" env DURATION=2 scripts/bench-audit-queries.sh

echo "== wall time per step"
printf '%s\n' "${timings[@]}"
echo "total $SECONDS s"
