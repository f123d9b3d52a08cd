# CPU placement for the load benchmarks (sourced by scripts/bench-*.sh).
#
# `split`: the server under test gets the first CPU this script may use to
# itself. With three or more CPUs the load generator gets the second and
# PostgreSQL (every process of the local `postgres` user, and the backends
# they fork later) the rest; with two, PostgreSQL and the load generator
# share the second. That is a production layout shrunk onto one machine
# (the database and the clients elsewhere), so a ratio between audit modes
# measures what auditing costs the API server, not how the machine's cores
# are shared out. On two CPUs the database still competes with the load
# generator (BENCHMARKS.md: what bounds durable mode there).
# `shared`: no placement; everything competes for every CPU.
#
# Usage: place_postgres TOPOLOGY; then prefix the server with
# "$(server_cpus TOPOLOGY)" and the load generator with
# "$(client_cpus TOPOLOGY)". `restore_postgres` (from the caller's EXIT
# trap) gives each PostgreSQL process back the CPUs it had.

# The CPUs this process may use (a cpuset or affinity may exclude some),
# one per line.
usable_cpus() {
    local list range
    list=$(taskset -pc $$ | sed 's/.*: //')
    for range in ${list//,/ }; do
        if [[ $range == *-* ]]; then seq "${range%-*}" "${range#*-}"; else echo "$range"; fi
    done
}
mapfile -t USABLE_CPUS < <(usable_cpus)
SERVER_CPU=${USABLE_CPUS[0]}
if [ "${#USABLE_CPUS[@]}" -ge 3 ]; then
    CLIENT_CPUS=${USABLE_CPUS[1]}
    POSTGRES_CPUS=$(IFS=,; echo "${USABLE_CPUS[*]:2}")
else
    CLIENT_CPUS=$(IFS=,; echo "${USABLE_CPUS[*]:1}")
    POSTGRES_CPUS=$CLIENT_CPUS
fi
# Each moved PostgreSQL process's CPUs before the move.
POSTGRES_MASKS=${TMPDIR:-/tmp}/nox-bench-postgres-cpus.$$

split_possible() {
    [ "${#USABLE_CPUS[@]}" -ge 2 ]
}

# The topology to use for `$1`: `shared` (said on stderr) where `split` is
# impossible.
usable_topology() { # topology
    if [ "$1" = split ] && ! split_possible; then
        echo "TOPOLOGY=split needs two CPUs; using shared" >&2
        echo shared
    else
        echo "$1"
    fi
}

server_cpus() { # topology
    if [ "$1" = split ]; then echo "taskset -c $SERVER_CPU"; fi
}

client_cpus() { # topology
    if [ "$1" = split ]; then echo "taskset -c $CLIENT_CPUS"; fi
}

place_postgres() { # topology
    if [ "$1" != split ]; then
        restore_postgres
        return 0
    fi
    echo "layout: server on CPU $SERVER_CPU, load generator on CPU(s) $CLIENT_CPUS, PostgreSQL on CPU(s) $POSTGRES_CPUS"
    local pid
    for pid in $(pgrep -u postgres || true); do
        grep -qs "^$pid " "$POSTGRES_MASKS" ||
            echo "$pid $(taskset -pc "$pid" 2>/dev/null | sed 's/.*: //')" >>"$POSTGRES_MASKS"
        taskset -a -cp "$POSTGRES_CPUS" "$pid" >/dev/null 2>&1 ||
            echo "warning: could not move PostgreSQL process $pid to CPUs $POSTGRES_CPUS" >&2
    done
}

restore_postgres() {
    [ -f "$POSTGRES_MASKS" ] || return 0
    local pid mask
    while read -r pid mask; do
        if [ -n "$mask" ]; then taskset -a -cp "$mask" "$pid" >/dev/null 2>&1 || true; fi
    done <"$POSTGRES_MASKS"
    rm -f "$POSTGRES_MASKS"
}
