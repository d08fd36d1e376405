#!/usr/bin/env bash
# PostgreSQL high availability with pg_auto_failover (#31): a monitor on 127.0.0.1:15440 and two
# data nodes on 15441 and 15442 (one primary, one synchronous standby), data under .run/pg.
# Failover after the primary dies is tuned to take seconds, not the defaults' ~60 s (see
# docs/operations.md for the settings and the measurements).
#
#   scripts/pg-cluster.sh up          create (or reuse) and start all three; wait until formed
#   scripts/pg-cluster.sh url         the multi-host URL for the checkout database
#   scripts/pg-cluster.sh status      one line per node: name, role, address, pid
#   scripts/pg-cluster.sh node N      start node N (1 or 2) again; waits until it is a standby
#   scripts/pg-cluster.sh kill N      SIGKILL node N (pg_autoctl and its postgres): a crash
#   scripts/pg-cluster.sh switchover  planned switchover (pg_autoctl perform switchover)
#   scripts/pg-cluster.sh down        stop the nodes, then the monitor
set -euo pipefail
cd "$(dirname "$0")/.."
dir="$PWD/.run/pg"
monitor_port=15440
node_ports=(0 15441 15442)
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bindir" ] || { echo "no PostgreSQL under /usr/lib/postgresql" >&2; exit 1; }
export PATH="$bindir:$PATH"
# pg_autoctl keeps its configuration, state and pid files under the XDG directories: ours, so
# this cluster shares nothing with the user's (or another cluster's) pg_autoctl.
export XDG_CONFIG_HOME="$dir/xdg/config" XDG_DATA_HOME="$dir/xdg/share" XDG_RUNTIME_DIR="$dir/xdg/run"
unset PGHOST PGPORT PGDATABASE PGUSER PGPASSWORD PGDATA
monitor_uri="postgres://autoctl_node@127.0.0.1:$monitor_port/pg_auto_failover?sslmode=disable"

# PostgreSQL and pg_autoctl refuse root: run them as postgres (setpriv execs, no session process).
as_postgres=()
[ "$(id -u)" = 0 ] && as_postgres=(setpriv --reuid=postgres --regid=postgres --init-groups --)
as_pg() { "${as_postgres[@]}" "$@"; }
sql() { # port db statement: one value per row, | between columns
  psql -X -q -At -h 127.0.0.1 -p "$1" -U postgres -d "$2" -c "$3" 2>/dev/null
}
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Running, and not a zombie (an orphan's parent here may never reap it).
running() { kill -0 "$1" 2>/dev/null && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null; }
alive() { [ -f "$dir/$1.pid" ] && running "$(cat "$dir/$1.pid")"; }
name_of() { case $1 in 1 | 2) echo "node$1" ;; *) echo "no node $1 (1 or 2)" >&2; exit 2 ;; esac; }

# Starts `pg_autoctl <args>` detached (its own session, so its process group is pg_autoctl and
# its postgres), its pid in .run/pg/<name>.pid and its output in .run/pg/<name>.log.
launch() {
  local name=$1; shift
  setsid "${as_postgres[@]}" pg_autoctl "$@" </dev/null >>"$dir/$name.log" 2>&1 &
  echo $! >"$dir/$name.pid"
}
prepare_dirs() {
  mkdir -p "$dir" "$XDG_CONFIG_HOME" "$XDG_DATA_HOME" "$XDG_RUNTIME_DIR"
  chmod 700 "$XDG_RUNTIME_DIR"
  [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$dir"
  return 0
}
# After a SIGKILL the killed pg_autoctl and postmaster may linger as zombies until PID 1 reaps
# them, and neither starts while its pid file (or postgres's socket lock file) names a pid that
# exists: drop the files whose pid is not running.
clear_stale() { # name port
  local f pid
  for f in "$XDG_RUNTIME_DIR/pg_autoctl$dir/$1/pg_autoctl.pid" "$dir/$1/postmaster.pid" \
    "/var/run/postgresql/.s.PGSQL.$2.lock" "/tmp/.s.PGSQL.$2.lock"; do
    [ -f "$f" ] || continue
    pid=$(head -1 "$f")
    [ -n "$pid" ] && running "$pid" || rm -f "$f"
  done
}
configured() { [ -f "$XDG_CONFIG_HOME/pg_autoctl$dir/$1/pg_autoctl.cfg" ]; }

# Creates the node in the foreground (`pg_autoctl create ...`, no --run) the first time, so its
# configuration can be tuned before its service starts; then `pg_autoctl run`, detached.
create() { # name create-args...
  local name=$1; shift
  configured "$name" && [ -f "$dir/$name/PG_VERSION" ] && return 0
  as_pg timeout 120 pg_autoctl create "$@" </dev/null >>"$dir/$name.log" 2>&1 ||
    { echo "pg_autoctl create $1 failed for $name; see $dir/$name.log" >&2; exit 1; }
}

start_monitor() {
  if alive monitor; then return; fi
  create monitor monitor --pgdata "$dir/monitor" --pgport "$monitor_port" \
    --hostname 127.0.0.1 --listen 127.0.0.1 --auth trust --no-ssl --pgctl "$bindir/pg_ctl"
  clear_stale monitor $monitor_port
  launch monitor run --pgdata "$dir/monitor"
  for _ in $(seq 1 300); do
    [ "$(sql $monitor_port pg_auto_failover 'select 1 from pg_extension where extname = $$pgautofailover$$')" = 1 ] && break
    sleep 0.2
  done
  [ "$(sql $monitor_port pg_auto_failover 'select 1 from pg_extension where extname = $$pgautofailover$$')" = 1 ] ||
    { echo "the monitor did not come up; see $dir/monitor.log" >&2; exit 1; }
  tune_monitor
}

# How fast the monitor calls a primary dead and promotes the standby (defaults in brackets):
# a health check every 1 s [5 s], 1 s connect timeout [5 s], 1 retry [2] 0.5 s later [2 s];
# unhealthy once it has not reported for 2 s [20 s]; the standby is promoted 5 s [30 s] after
# the old primary was told to demote: the window in which a primary that is only cut off is
# meant to stop itself (tune_nodes and start_node; docs/operations.md has how far it fits).
tune_monitor() {
  # ALTER SYSTEM is refused in a transaction block: statements from stdin, each its own.
  psql -X -q -h 127.0.0.1 -p $monitor_port -U postgres -d pg_auto_failover -v ON_ERROR_STOP=1 <<'SQL' >/dev/null
    ALTER SYSTEM SET pgautofailover.health_check_period = 1000;
    ALTER SYSTEM SET pgautofailover.health_check_timeout = 1000;
    ALTER SYSTEM SET pgautofailover.health_check_max_retries = 1;
    ALTER SYSTEM SET pgautofailover.health_check_retry_delay = 500;
    ALTER SYSTEM SET pgautofailover.node_considered_unhealthy_timeout = 2000;
    ALTER SYSTEM SET pgautofailover.primary_demote_timeout = 5000;
    ALTER SYSTEM SET pgautofailover.startup_grace_period = 1000;
    SELECT pg_reload_conf();
SQL
}

# The keeper's side: a primary that reaches neither the monitor nor its standby for 2 s [20 s]
# demotes itself (timeout.network_partition_timeout).
start_node() { # N
  local name; name=$(name_of "$1")
  if alive "$name"; then return; fi
  create "$name" postgres --pgdata "$dir/$name" --pgport "${node_ports[$1]}" \
    --hostname 127.0.0.1 --listen 127.0.0.1 --name "$name" --auth trust --no-ssl \
    --pgctl "$bindir/pg_ctl" --monitor "$monitor_uri"
  as_pg pg_autoctl config set --pgdata "$dir/$name" timeout.network_partition_timeout 2 >/dev/null 2>>"$dir/$name.log"
  clear_stale "$name" "${node_ports[$1]}"
  launch "$name" run --pgdata "$dir/$name"
}

# A primary cut off from the monitor and its standby shuts itself down once it has seen
# neither for network_partition_timeout, counted from the last time it saw the standby
# connected while the monitor was already gone: pg_stat_replication keeps a dead standby
# for wal_sender_timeout (30 s as pg_autoctl sets it). 8 s, and not less: the keeper needs
# ~3 s to find the monitor gone (a 2 s connect timeout it hard-codes, a 1 s loop), and with
# the standby dropped before that it never counts itself cut off (pg_auto_failover 2.0 needs
# that sighting), so it would never stop. postgresql.auto.conf wins over pg_autoctl's include
# file, and pg_basebackup and pg_rewind carry it to a rebuilt node.
tune_nodes() {
  for i in 1 2; do
    psql -X -q -h 127.0.0.1 -p "${node_ports[$i]}" -U postgres -d postgres \
      -c "ALTER SYSTEM SET wal_sender_timeout = '8s'" -c "SELECT pg_reload_conf()" >/dev/null
  done
}

# Each node as the monitor sees it: name|reported state|goal state|port|health.
nodes() {
  sql $monitor_port pg_auto_failover \
    "select nodename, reportedstate, goalstate, nodeport, health from pgautofailover.node order by nodeid"
}
primary_port() { nodes | awk -F'|' '$2 == "primary" && $3 == "primary" { print $4 }' | head -1; }

# One primary and one secondary, both where the monitor wants them, and the primary waiting
# for its standby's commits (synchronous_standby_names set, the standby streaming as sync).
formed() {
  local states p
  states=$(nodes | awk -F'|' '$2 == $3 { print $2 }' | sort | tr '\n' ' ')
  [ "$states" = "primary secondary " ] || return 1
  p=$(primary_port)
  [ -n "$(sql "$p" postgres 'show synchronous_standby_names')" ] &&
    [ "$(sql "$p" postgres "select count(*) from pg_stat_replication
      where state = 'streaming' and sync_state in ('sync', 'quorum')")" = 1 ]
}
wait_formed() { # what seconds
  for _ in $(seq 1 $(($2 * 5))); do formed && return 0; sleep 0.2; done
  echo "timed out after $2 s waiting for $1:" >&2
  nodes >&2 || true
  exit 1
}

url() {
  echo "postgres://postgres:postgres@127.0.0.1:${node_ports[1]},127.0.0.1:${node_ports[2]}/checkout?target_session_attrs=read-write"
}

up() {
  command -v pg_autoctl >/dev/null || scripts/ensure-pg-auto-failover.sh
  prepare_dirs
  start_monitor
  # The first node becomes the primary; the second clones it, so it starts once the first runs.
  start_node 1
  start_node 2
  wait_formed "a primary and a synchronous standby" 60
  tune_nodes
  local p; p=$(primary_port)
  [ "$(sql "$p" postgres "select 1 from pg_database where datname = 'checkout'")" = 1 ] ||
    sql "$p" postgres "CREATE DATABASE checkout OWNER postgres" >/dev/null
  # Our URLs use postgres/postgres; harmless where local auth is trust.
  sql "$p" postgres "ALTER USER postgres PASSWORD 'postgres'" >/dev/null
  status
  url
}

status() {
  local pid role line
  pid=-; alive monitor && pid=$(cat "$dir/monitor.pid")
  role=monitor; listening $monitor_port || role=down
  printf '%-8s %-10s %-16s %s\n' monitor "$role" "127.0.0.1:$monitor_port" "$pid"
  local rows; rows=$(nodes || true)
  for i in 1 2; do
    local name="node$i" port=${node_ports[$i]}
    pid=-; alive "$name" && pid=$(cat "$dir/$name.pid")
    line=$(echo "$rows" | awk -F'|' -v n="$name" '$1 == n')
    role=$(echo "$line" | awk -F'|' '{
      if ($2 == "primary" && $3 == "primary") print "primary";
      else if ($2 == "secondary" && $3 == "secondary") print "standby";
      else if ($2 == $3) print $2;
      else print $2 "->" $3 }')
    if [ -z "$line" ] || ! listening "$port"; then role=down; fi
    printf '%-8s %-10s %-16s %s\n' "$name" "$role" "127.0.0.1:$port" "$pid"
  done
}

# SIGKILL the node's process group: pg_autoctl, its postgres and every backend, nothing flushed.
kill_node() { # N
  local name; name=$(name_of "$1")
  alive "$name" || { echo "$name is not running" >&2; return 0; }
  # PostgreSQL's children are process-group leaders of their own: kill the postmaster's
  # children together with the group, in one kill(1).
  local pm kids
  pm=$(head -1 "$dir/$name/postmaster.pid" 2>/dev/null || true)
  kids=$( [ -n "$pm" ] && pgrep -P "$pm" | tr '\n' ' ' || true)
  # shellcheck disable=SC2086
  kill -KILL -- "-$(cat "$dir/$name.pid")" $kids 2>/dev/null || true
  rm -f "$dir/$name.pid"
  for _ in $(seq 1 50); do listening "${node_ports[$1]}" || break; sleep 0.1; done
  echo "killed $name"
}

node() { # N: start it again; it rejoins as a standby (pg_auto_failover rewinds an old primary)
  local name started; name=$(name_of "$1")
  prepare_dirs
  # The monitor's view from before the kill does not count: wait for a report made since.
  started=$(sql $monitor_port pg_auto_failover 'select now()')
  start_node "$1"
  for _ in $(seq 1 300); do
    [ "$(sql $monitor_port pg_auto_failover "select reportedstate || '|' || goalstate from pgautofailover.node
      where nodename = '$name' and reporttime > '$started'")" = "secondary|secondary" ] && break
    sleep 0.2
  done
  wait_formed "$name to rejoin as the synchronous standby" 5
  status
}

switchover() {
  local before; before=$(primary_port)
  as_pg pg_autoctl perform switchover --pgdata "$dir/monitor" --formation default --group 0 >>"$dir/switchover.log" 2>&1 ||
    as_pg pg_autoctl perform switchover --monitor "$monitor_uri" --formation default --group 0 >>"$dir/switchover.log" 2>&1
  wait_formed "the switchover to finish" 60
  echo "primary moved from 127.0.0.1:$before to 127.0.0.1:$(primary_port)"
}

# SIGINT is pg_autoctl's fast stop (postgres stopped with -m fast); up to 15 s, then SIGKILL.
stop() { # name
  alive "$1" || { rm -f "$dir/$1.pid"; return 0; }
  local pid; pid=$(cat "$dir/$1.pid")
  kill -INT "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$dir/$1.pid"
}
down() {
  stop node1 & stop node2 & wait
  stop monitor
  echo "stopped"
}

case ${1:-} in
  up) up ;;
  url) url ;;
  status) status ;;
  node) node "${2:?node number}" ;;
  kill) kill_node "${2:?node number}" ;;
  switchover) switchover ;;
  down) down ;;
  *) echo "usage: $0 up|url|status|node N|kill N|switchover|down" >&2; exit 2 ;;
esac
