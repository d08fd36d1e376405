#!/usr/bin/env bash
# Makes sure pg_autoctl (pg_auto_failover) is installed, for scripts/pg-cluster.sh and the
# PostgreSQL HA test: installs the package for the newest installed PostgreSQL major
# (postgresql-<major>-auto-failover, Debian, as root) when it is missing.
set -euo pipefail
command -v pg_autoctl >/dev/null 2>&1 && exit 0
major=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -1)
if [ -z "$major" ]; then
  echo "no PostgreSQL under /usr/lib/postgresql: run scripts/ensure-postgres.sh first" >&2; exit 1
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing pg_auto_failover for PostgreSQL $major (Debian package)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "postgresql-$major-auto-failover" >/dev/null
else
  echo "no pg_autoctl: install postgresql-$major-auto-failover (pg_auto_failover) as root" >&2; exit 1
fi
command -v pg_autoctl >/dev/null 2>&1 || { echo "postgresql-$major-auto-failover did not provide pg_autoctl" >&2; exit 1; }
