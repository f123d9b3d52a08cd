# CPU placement for the load benchmarks (sourced by scripts/bench-*.sh).
#
# `split`: the server under test gets CPU 0 to itself; PostgreSQL (every
# process of the local `postgres` user, and the backends they fork later)
# and the load generator share the other CPUs. That is a production layout
# shrunk onto one machine (the database and the clients elsewhere), so a
# ratio between audit modes measures what auditing costs the API server,
# not how the machine's two cores are shared out. `shared`: no placement;
# everything competes for every CPU.
#
# Usage: place_postgres TOPOLOGY; then prefix the server with
# "$(server_cpus TOPOLOGY)" and the load generator with
# "$(client_cpus TOPOLOGY)". PostgreSQL is given every CPU back on exit
# (`restore_postgres`, from the caller's EXIT trap).

CPU_COUNT=$(nproc --all)
ALL_CPUS="0-$((CPU_COUNT - 1))"

split_possible() {
    [ "$CPU_COUNT" -ge 2 ]
}

server_cpus() { # topology
    if [ "$1" = split ]; then echo "taskset -c 0"; fi
}

client_cpus() { # topology
    if [ "$1" = split ]; then echo "taskset -c 1-$((CPU_COUNT - 1))"; fi
}

postgres_pids() {
    pgrep -u postgres || true
}

place_postgres() { # topology
    local cpus=$ALL_CPUS pid
    if [ "$1" = split ]; then cpus="1-$((CPU_COUNT - 1))"; fi
    for pid in $(postgres_pids); do taskset -a -cp "$cpus" "$pid" >/dev/null 2>&1 || true; done
}

restore_postgres() {
    place_postgres shared
}
