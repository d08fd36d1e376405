#!/usr/bin/env bash
# Makes sure `promtool` is on the PATH (Debian's prometheus package), for scripts/ops-check.sh.
set -euo pipefail
command -v promtool >/dev/null && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing promtool (Debian package prometheus)" >&2
  # The package would start a server where systemd runs; we only want its tools.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }
else
  echo "promtool missing: install Debian's prometheus package" >&2; exit 1
fi
