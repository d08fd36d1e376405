#!/usr/bin/env bash
# The OpenAPI contract, enforced: starts the whole stack on free ports (its own nats-server and
# database), then runs schemathesis against GET /openapi.json with an admin token: every route,
# the stateful links between them, and the checks below. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CHECKOUT_BIN:-target/debug/checkout}
psp_bin=$(dirname "$bin")/sandbox-psp
[ -x "$bin" ] && [ -x "$psp_bin" ] || cargo build --locked --quiet
examples=${CONTRACT_EXAMPLES:-40}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
nats_port=$(free_port); http_port=$(free_port); psp_port=$(free_port)
db="checkout_contract_$$"
cleanup() {
  [ -n "${app_pid:-}" ] && kill "$app_pid" 2>/dev/null || true
  [ -n "${psp_pid:-}" ] && kill "$psp_pid" 2>/dev/null || true
  [ -n "${nats_pid:-}" ] && kill "$nats_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
.venv/bin/nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$work/js" >"$work/nats.log" 2>&1 &
nats_pid=$!
export CHECKOUT__NATS__URL="nats://127.0.0.1:$nats_port"
export CHECKOUT__DATABASE__URL="${CONTRACT_DATABASE_BASE:-postgres://postgres:postgres@127.0.0.1:5432}/$db"
export CHECKOUT__HTTP__ADDR="127.0.0.1:$http_port"
export CHECKOUT__PSP__URL="http://127.0.0.1:$psp_port"
export CHECKOUT__METRICS__ADDR="127.0.0.1:0"
CHECKOUT__AUTH__JWT_SECRET="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export CHECKOUT__AUTH__JWT_SECRET
CHECKOUT__PAYMENTS__TOKEN_KEYS="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export CHECKOUT__PAYMENTS__TOKEN_KEYS
# A fuzzer is one very busy user: per-user limits would answer most of it 429.
export CHECKOUT__EDGE__REQUESTS_PER_USER_PER_S=1000000 CHECKOUT__EDGE__REQUESTS_PER_USER_BURST=1000000
export CHECKOUT__EDGE__CHECKOUTS_PER_USER_PER_MIN=1000000 CHECKOUT__EDGE__CHECKOUTS_PER_USER_BURST=1000000
export RUST_LOG=${RUST_LOG:-warn}
for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/$nats_port) 2>/dev/null && break; sleep 0.1; done
"$psp_bin" --listen "127.0.0.1:$psp_port" >"$work/psp.log" 2>&1 &
psp_pid=$!
"$bin" run all >"$work/app.log" 2>&1 &
app_pid=$!
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$http_port/readyz" >/dev/null 2>&1 && break; sleep 0.2
done
token=$("$bin" token --user contract-admin --admin)
set +e
.venv/bin/schemathesis run "http://127.0.0.1:$http_port/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples "$examples" --seed 42 --workers 1 \
  --report junit --report-dir "$work/report" 2>&1 | tee "$work/st.log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" != 0 ]; then
  echo "--- app log (last 40 lines)"; tail -40 "$work/app.log"
fi
exit "$status"
