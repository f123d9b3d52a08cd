# CPU placement for the load benchmarks (sourced by scripts/bench-*.sh).
#
# `split`: the server under test gets the first CPU this script may use to
# itself; PostgreSQL (every process of the local `postgres` user, and the
# backends they fork later) and the load generator share the others. That
# is a production layout shrunk onto one machine (the database and the
# clients elsewhere), so a ratio between audit modes measures what auditing
# costs the API server, not how the machine's cores are shared out.
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
OTHER_CPUS=$(IFS=,; echo "${USABLE_CPUS[*]:1}")
# Each moved PostgreSQL process's CPUs before the move.
POSTGRES_MASKS=${TMPDIR:-/tmp}/nox-bench-postgres-cpus.$$

split_possible() {
    [ "${#USABLE_CPUS[@]}" -ge 2 ]
}

server_cpus() { # topology
    if [ "$1" = split ]; then echo "taskset -c $SERVER_CPU"; fi
}

client_cpus() { # topology
    if [ "$1" = split ]; then echo "taskset -c $OTHER_CPUS"; fi
}

place_postgres() { # topology
    if [ "$1" != split ]; then
        restore_postgres
        return 0
    fi
    local pid
    for pid in $(pgrep -u postgres || true); do
        grep -qs "^$pid " "$POSTGRES_MASKS" ||
            echo "$pid $(taskset -pc "$pid" 2>/dev/null | sed 's/.*: //')" >>"$POSTGRES_MASKS"
        taskset -a -cp "$OTHER_CPUS" "$pid" >/dev/null 2>&1 ||
            echo "warning: could not move PostgreSQL process $pid to CPUs $OTHER_CPUS" >&2
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
