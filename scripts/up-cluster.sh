#!/usr/bin/env bash
# `just up-cluster`: the three nats-servers of nats/cluster/ (R3 streams, fsync always, three
# saga partitions), a PostgreSQL HA group unless a database is configured (pg_auto_failover:
# monitor, primary and synchronous standby, scripts/pg-cluster.sh), migrations, and two
# processes of every role,
# each role as its own NATS user, every process given all three server URLs. Ctrl-C (or
# SIGTERM) stops all of it; so does `just down` from another terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/local-secrets.sh
dir=.run/cluster
if [ -z "${CHECKOUT__DATABASE__URL:-}" ]; then
  # The system PostgreSQL's binaries run the group; its own server is not used.
  scripts/ensure-postgres.sh
  scripts/ensure-pg-auto-failover.sh
  scripts/pg-cluster.sh up | sed 's/^/  pg  /'
  CHECKOUT__DATABASE__URL=$(scripts/pg-cluster.sh url)
  export CHECKOUT__DATABASE__URL
fi
mkdir -p "$dir"
cargo build --release --locked --quiet
bin=target/release/checkout

# GET a monitoring path with bash alone (no curl on a bare machine); prints the body.
http_get() {
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
  sed '1,/^\r$/d' <&3
  exec 3<&-
}

for i in 1 2 3; do
  if (exec 3<>"/dev/tcp/127.0.0.1/1423$i") 2>/dev/null; then
    echo "nats-server n$i already listening on 127.0.0.1:1423$i"
  else
    scripts/cluster-node.sh "$i"
  fi
done
# /healthz is ok once this node has JetStream and knows the meta leader: streams can be made.
for _ in $(seq 1 150); do
  http_get 18231 /healthz 2>/dev/null | grep -q '"ok"' && break
  sleep 0.2
done
http_get 18231 /healthz | grep -q '"ok"' || { echo "the cluster did not become healthy" >&2; exit 1; }

export CHECKOUT__NATS__URL="nats://127.0.0.1:14231,nats://127.0.0.1:14232,nats://127.0.0.1:14233"
export CHECKOUT__NATS__REPLICAS=3
# The nodes' configs map checkout.<event>.<id> to three partitions (nats/cluster/partitions.conf).
export CHECKOUT__NATS__PARTITIONS=3
$bin migrate
# Create the partition streams and put their leaders on three different nodes (operator rights).
CHECKOUT__NATS__USER=operator CHECKOUT__NATS__PASSWORD="$CHECKOUT_NATS_OPERATOR_PASSWORD" \
  RUST_LOG=error $bin leaders --spread | sed 's/^/  leader  /'


pids=()
start() { # name role metrics-port [extra env...]
  local name=$1 role=$2 port=$3; shift 3
  local var="CHECKOUT_NATS_${role^^}_PASSWORD"
  env CHECKOUT__NATS__USER="$role" CHECKOUT__NATS__PASSWORD="${!var:-}" \
    CHECKOUT__METRICS__ADDR="127.0.0.1:$port" "$@" \
    "$bin" run "$role" >"$dir/$name.log" 2>&1 &
  pids+=($!)
  echo $! >"$dir/$name.pid"
}
stop() {
  trap - INT TERM
  echo; echo "stopping the cluster's processes and servers"
  scripts/down.sh
  exit 0
}
trap stop INT TERM

target/release/sandbox-psp --listen 127.0.0.1:8090 \
  --webhook-url http://127.0.0.1:8080/api/webhooks/psp/sandbox >"$dir/psp.log" 2>&1 &
pids+=($!); echo $! >"$dir/psp.pid"
target/release/sandbox-psp --listen 127.0.0.1:8091 \
  --webhook-url http://127.0.0.1:8080/api/webhooks/psp/fallback >"$dir/psp-fallback.log" 2>&1 &
pids+=($!); echo $! >"$dir/psp-fallback.pid"
export CHECKOUT__PSP__FALLBACK_URL=${CHECKOUT__PSP__FALLBACK_URL-http://127.0.0.1:8091}
port=9461
for n in 1 2; do
  start "edge-$n" edge 0 CHECKOUT__HTTP__ADDR="127.0.0.1:808$((n - 1))"
  for role in reserve authorize order compensate; do
    start "$role-$n" "$role" "$port"
    port=$((port + 1))
  done
done

cat <<MSG

A 3-node JetStream cluster (three saga partitions, CHECKOUT-0..2, leaders spread above) and two
processes of every role (each role its own NATS user):
  nats-server   n1 127.0.0.1:14231  n2 :14232  n3 :14233   monitoring :18231-18233
                pids and logs in $dir/ (n1.pid, n1.log, ...)
  postgresql    ${CHECKOUT__DATABASE__URL%%/checkout*}/checkout
                (pg_auto_failover: monitor :15440, nodes :15441 :15442; just pg-status)
  edges         http://127.0.0.1:8080 and http://127.0.0.1:8081 (the same carts and orders on both)
  psp           http://127.0.0.1:8090
  processes     $dir/<role>-<1|2>.log and .pid; metrics on 127.0.0.1:9461-9468
  tokens        $bin token --user alice   ($bin token --user admin --admin)
  break it      kill -9 \$(cat $dir/n2.pid)        then bring it back: just cluster-node 2
                kill -9 \$(cat $dir/reserve-1.pid)
                just pg-kill 1  (the PostgreSQL node; just pg-status shows which is primary)
                then bring it back as a standby: just pg-node 1;  planned: just pg-switchover
  rebalance     after a node comes back:  CHECKOUT__NATS__PARTITIONS=3 CHECKOUT__NATS__URL=$CHECKOUT__NATS__URL \\
                CHECKOUT__NATS__USER=operator CHECKOUT__NATS__PASSWORD=\$CHECKOUT_NATS_OPERATOR_PASSWORD $bin leaders --spread
  nats CLI      nats -s $CHECKOUT__NATS__URL --user operator --password "\$CHECKOUT_NATS_OPERATOR_PASSWORD" stream report
Ctrl-C (or just down) stops everything.
MSG
# Run until told to stop, even if some processes are killed on purpose meanwhile.
while true; do sleep 1; done
