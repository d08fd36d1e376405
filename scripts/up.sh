#!/usr/bin/env bash
# `just up`: start NATS 2.15 and PostgreSQL unless configured, migrate, run every role.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/local-secrets.sh
scripts/ensure-postgres.sh
# This process runs every role, so it connects as the operator user.
if [ -z "${CHECKOUT__NATS__URL:-}" ]; then
  export CHECKOUT__NATS__USER=operator CHECKOUT__NATS__PASSWORD="$CHECKOUT_NATS_OPERATOR_PASSWORD"
  port=${NATS_PORT:-14222}
  if ! (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    # The config keeps its data in .run/nats (relative to the repository).
    .venv/bin/nats-server -c nats/single.conf -p "$port" -l .run/nats.log &
    echo "started nats-server 2.15 on 127.0.0.1:$port (log .run/nats.log)"
    for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  fi
  export CHECKOUT__NATS__URL="nats://127.0.0.1:$port"
fi
cargo build --release --locked --quiet
bin=target/release/checkout
$bin migrate
cat <<MSG

checkout is starting on http://127.0.0.1:8080 (sandbox PSP on 127.0.0.1:8090)
  admin token:  $bin token --user admin --admin
  buyer token:  $bin token --user alice
  try:          curl -s localhost:8080/readyz
  NATS users:   one per role (nats/auth.conf), passwords in .run/nats.env; this process runs every
                role as "operator". The nats CLI: nats --user operator --password "\$CHECKOUT_NATS_OPERATOR_PASSWORD"
MSG
exec $bin run all
