#!/usr/bin/env bash
# `just cluster-node N`: start node N (1-3) of nats/cluster/ (again, after killing it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${CHECKOUT_NATS_OPERATOR_PASSWORD:-}" ] || . scripts/local-secrets.sh
i=$1
mkdir -p .run/cluster
# setsid: a node outlives the shell that started it; `just down` stops it by its pid file.
setsid .venv/bin/nats-server -c "nats/cluster/n$i.conf" -l ".run/cluster/n$i.log" </dev/null >/dev/null 2>&1 &
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/1423$i") 2>/dev/null && break; sleep 0.1; done
if ! (exec 3<>"/dev/tcp/127.0.0.1/1423$i") 2>/dev/null; then
  echo "nats-server n$i did not start; see .run/cluster/n$i.log" >&2
  exit 1
fi
echo "started nats-server n$i on 127.0.0.1:1423$i (log .run/cluster/n$i.log)"
