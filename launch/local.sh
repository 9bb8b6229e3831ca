#!/usr/bin/env bash
# Run `jalign train ARGS...` on this machine and restart it whenever it exits with 75:
# the code jalign uses after saving a checkpoint on SIGTERM (preemption). A restart resumes
# from that checkpoint. Any other exit code ends the loop with that code.
#
#   launch/local.sh configs/demo/sft_add.gin --gin "TrainConfig.steps=2000"
#
# JALIGN=/path/to/jalign picks the command (default: `jalign` on PATH, else .venv/bin/jalign);
# JALIGN_MAX_RESTARTS caps the restarts (default 100). A SIGTERM/SIGINT sent to this script
# is passed to the run, and the loop then stops instead of restarting.
set -u
jalign_cmd=${JALIGN:-$(command -v jalign || echo "$(dirname "$0")/../.venv/bin/jalign")}
max_restarts=${JALIGN_MAX_RESTARTS:-100}
stopping=0
child=0
forward() { stopping=1; [ "$child" -ne 0 ] && kill -TERM "$child" 2>/dev/null; }
trap forward TERM INT

restarts=0
while true; do
  "$jalign_cmd" train "$@" &
  child=$!
  # `wait` returns early (128 + signal) when a trapped signal arrives: wait for the run to
  # finish saving, then ask once more for its own status (bash keeps it after reaping).
  wait "$child"
  while kill -0 "$child" 2>/dev/null; do wait "$child"; done
  wait "$child"; rc=$?
  child=0
  if [ "$rc" -ne 75 ] || [ "$stopping" -eq 1 ]; then exit "$rc"; fi
  if [ "$restarts" -ge "$max_restarts" ]; then
    echo "launch/local.sh: preempted again after $restarts restarts; giving up" >&2
    exit "$rc"
  fi
  restarts=$((restarts + 1))
  echo "launch/local.sh: run saved and exited 75 (preempted); restart $restarts/$max_restarts" >&2
done
