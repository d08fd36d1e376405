#!/usr/bin/env bash
# `just down`: stop what `just up-cluster` started (processes first, then the servers, then the
# PostgreSQL group), by
# their pid files: SIGTERM, up to 15 s to drain, then SIGKILL. Leaves nothing running.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=.run/cluster
stop_all() {
  local files=("$@") pids=()
  for f in "${files[@]}"; do
    [ -f "$f" ] || continue
    pid=$(cat "$f"); rm -f "$f"
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  for _ in $(seq 1 150); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}
shopt -s nullglob
procs=()
for f in "$dir"/*.pid; do case $(basename "$f") in n[0-9].pid) ;; *) procs+=("$f") ;; esac; done
stop_all "${procs[@]}"
stop_all "$dir"/n[0-9].pid
# The PostgreSQL HA group, if up-cluster started one.
if [ -d .run/pg ]; then scripts/pg-cluster.sh down; fi
echo "stopped"
