#!/usr/bin/env bash
# Makes sure `jq` is on the PATH (Debian's package): the README's try-it block uses it, and
# tests/api/readme.rs runs that block as pasted.
set -euo pipefail
command -v jq >/dev/null && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing jq (Debian package)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >/dev/null; }
else
  echo "jq missing: install it (apt-get install jq)" >&2; exit 1
fi
