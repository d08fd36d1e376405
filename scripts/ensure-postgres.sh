#!/usr/bin/env bash
# Makes sure a PostgreSQL answers on 127.0.0.1:5432 when no CHECKOUT__DATABASE__URL is set:
# starts the local cluster if one is installed, installs one (Debian, as root) otherwise.
set -euo pipefail
if [ -n "${CHECKOUT__DATABASE__URL:-}" ]; then exit 0; fi
ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
ready && exit 0
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing PostgreSQL (Debian package)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "no PostgreSQL: install one or set CHECKOUT__DATABASE__URL" >&2; exit 1
  fi
fi
version=$(ls /etc/postgresql | sort -V | tail -1)
pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || pg_ctlcluster "$version" main start
for _ in $(seq 1 50); do ready && break; sleep 0.2; done
ready || { echo "PostgreSQL did not come up" >&2; exit 1; }
# Our default URL uses postgres/postgres; harmless where local auth is trust.
su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null 2>&1 || true
