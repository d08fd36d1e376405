#!/usr/bin/env bash
# `just up`: start NATS 2.15 and PostgreSQL unless configured, migrate, run every role.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .run
# The edge refuses the built-in development secret: generate one, once, readable only by us.
# `checkout token` reads the same file (Settings::load), so tokens and the edge agree.
if [ ! -f .run/local.toml ] && [ -z "${CHECKOUT__AUTH__JWT_SECRET:-}" ]; then
  (umask 077; printf '# Written once by ./dev up: local secrets, never committed.\n[auth]\njwt_secret = "%s"\n' \
    "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" > .run/local.toml)
  echo "generated a JWT secret into .run/local.toml"
fi
scripts/ensure-postgres.sh
# NATS users per role (nats/auth.conf): passwords generated once, readable only by us; this
# process (every role) connects as the operator user.
if [ ! -f .run/nats.env ]; then
  (umask 077; for role in EDGE RESERVE AUTHORIZE ORDER COMPENSATE OPERATOR; do
    echo "CHECKOUT_NATS_${role}_PASSWORD=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  done > .run/nats.env)
fi
set -a; . ./.run/nats.env; set +a
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
