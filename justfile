# Everyday tasks. Plain cargo commands work just as well; see README.md.

# Run the server (embedded PostgreSQL unless DATABASE_URL is set).
run *ARGS:
    cargo build --release --bins
    target/release/nox-server {{ARGS}}

# The whole test suite, as CI runs it.
test:
    cargo test --workspace

# Formatting check and clippy, as CI runs them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

fmt:
    cargo fmt --all

# Apply pending migrations (to DATABASE_URL, or the embedded cluster).
migrate *ARGS:
    cargo run --release -p nox-migrate -- up {{ARGS}}

# Migration state.
migrate-status:
    cargo run --release -p nox-migrate -- status

# Benchmarks, each figure beside its same-run baseline (not in CI; BENCHMARKS.md).
bench:
    scripts/bench.sh

# Everything CI runs.
ci:
    bash .ci/run
