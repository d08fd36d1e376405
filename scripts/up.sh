#!/usr/bin/env bash
# `just up`: start NATS 2.15 and PostgreSQL unless configured, the sandbox PSP, migrate, run
# every role.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/local-secrets.sh
scripts/ensure-postgres.sh
# This process runs every role, so it connects as the operator user.
if [ -z "${CHECKOUT__NATS__URL:-}" ]; then
  export CHECKOUT__NATS__USER=operator CHECKOUT__NATS__PASSWORD="$CHECKOUT_NATS_OPERATOR_PASSWORD"
  port=${NATS_PORT:-14222}
  if ! (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    # The config keeps its data in .run/nats (relative to the repository). Its own session, so
    # Ctrl-C stops checkout first (which drains against a live server), then this script stops it.
    setsid .venv/bin/nats-server -c nats/single.conf -p "$port" -l .run/nats.log &
    nats_pid=$!
    echo "started nats-server 2.15 on 127.0.0.1:$port (log .run/nats.log)"
    for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  fi
  export CHECKOUT__NATS__URL="nats://127.0.0.1:$port"
fi
bin=target/release/checkout
if [ ! -x "$bin" ]; then
  echo "building checkout (release): the first build compiles ~400 crates and takes minutes (about 10 on 2 cores)"
fi
# Not --quiet: a first build shows its progress instead of minutes of silence.
cargo build --release --locked
# The payment provider is someone else's system: its own process, its own session.
# Its webhooks (3-D Secure outcomes, tok_async) go to the edge, signed (.run/psp.env).
# Two of them: the primary, and a fallback for new checkouts while the primary's breaker is
# open (try `curl -X POST localhost:8090/v1/sandbox/outage -d '{"seconds":60}'`).
setsid target/release/sandbox-psp --listen 127.0.0.1:8090 \
  --webhook-url http://127.0.0.1:8080/api/webhooks/psp/sandbox >.run/psp.log 2>&1 &
psp_pid=$!
setsid target/release/sandbox-psp --listen 127.0.0.1:8091 \
  --webhook-url http://127.0.0.1:8080/api/webhooks/psp/fallback >.run/psp-fallback.log 2>&1 &
fallback_pid=$!
export CHECKOUT__PSP__FALLBACK_URL=${CHECKOUT__PSP__FALLBACK_URL-http://127.0.0.1:8091}
# Merchant webhooks to receivers on this machine (a shop's real endpoints are public).
export CHECKOUT__WEBHOOKS__ALLOW_PRIVATE_TARGETS=${CHECKOUT__WEBHOOKS__ALLOW_PRIVATE_TARGETS-true}
# When checkout has stopped (Ctrl-C, SIGTERM), stop what this script started.
trap 'kill ${nats_pid:-} "$psp_pid" "$fallback_pid" 2>/dev/null; wait ${nats_pid:-} "$psp_pid" "$fallback_pid" 2>/dev/null || true' EXIT
$bin migrate
cat <<MSG

checkout is starting on http://127.0.0.1:8080 (sandbox PSPs: primary 127.0.0.1:8090, fallback :8091;
logs .run/psp.log, .run/psp-fallback.log)
  admin token:  $bin token --user admin --admin
  buyer token:  $bin token --user alice
  try:          curl -s localhost:8080/readyz
  NATS users:   one per role (nats/auth.conf), passwords in .run/nats.env; this process runs every
                role as "operator". The nats CLI: nats --user operator --password "\$CHECKOUT_NATS_OPERATOR_PASSWORD"
MSG
# Not exec: when checkout has stopped (Ctrl-C, SIGTERM), the trap above stops the servers.
$bin run all
