#!/usr/bin/env bash
# Makes sure an old nats-server (Debian's package: 2.9 in bookworm) is at hand for the test that
# checks the roles refuse a server that ignores their consumers' subject filters
# (tests/api/old_server.rs). NATS_SERVER_OLD_BIN names another one.
set -euo pipefail
[ -n "${NATS_SERVER_OLD_BIN:-}" ] && exit 0
[ -x /usr/sbin/nats-server ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's nats-server package (an old server, for tests/api/old_server.rs)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null; }
else
  echo "/usr/sbin/nats-server missing: install Debian's nats-server package or set NATS_SERVER_OLD_BIN" >&2
  exit 1
fi
