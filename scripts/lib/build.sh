# Sourced by the load benchmarks (bash): building what they run.

# Builds the load generator, and the server unless NOX_SERVER_BIN names
# another build to measure (A/B).
build_load_tools() {
    if [ -n "${NOX_SERVER_BIN:-}" ]; then
        cargo build --release -q -p nox-load
    else
        cargo build --release -q -p nox-server -p nox-load
    fi
}
