# CPU time in clock ticks, for the load scripts' CPU per request: of one
# process, of every PostgreSQL process (the backends alive at the time),
# and of the whole machine (busy time, all cores). TICK_US: a tick in µs.
ticks_of() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
postgres_ticks() {
    local total=0 pid
    for pid in $(pgrep -u postgres || true); do total=$((total + $(ticks_of "$pid"))); done
    echo "$total"
}
busy_ticks() { awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))
