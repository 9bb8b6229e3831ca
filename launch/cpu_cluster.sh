#!/usr/bin/env bash
# N `jalign train` processes on this machine standing in for N hosts: each has K CPU
# devices and process 0 is the coordinator; cross-process collectives run over gloo. The
# same code paths as a pod (per-host data, global arrays, collective saves, preemption
# agreement) run here, which is how the multi-host tests exercise them.
#
#   launch/cpu_cluster.sh --processes 2 --devices-per-process 2 configs/demo/sft_add.gin \
#       --gin "TrainConfig.steps=20"
#
# Options (before the config files): --processes N (2), --devices-per-process K (1),
# --port P (the coordinator's port; P+1 is the rendezvous; default: a free one),
# --timeout S (JALIGN_INIT_TIMEOUT: how long process 0 waits for the others, 60),
# --max-restarts R (restarts after every process saved on SIGTERM and exited 75; default
# JALIGN_MAX_RESTARTS or 100). Process 0 prints as usual; the others' lines start with
# "[process i] ". A process that fails (exit not 0/75) takes the others down, since they
# would otherwise wait in a collective for it. JALIGN=/path/to/jalign picks the command.
# Needs bash >= 5.1 (wait -n -p).
set -u
if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "launch/cpu_cluster.sh needs bash >= 5.1 (wait -n -p); this is $BASH_VERSION" >&2
  exit 2
fi
usage() { echo "usage: launch/cpu_cluster.sh [--processes N] [--devices-per-process K] [--port P] [--timeout S] [--max-restarts R] CONFIG.gin [...] [--gin BINDING ...]" >&2; exit 2; }

processes=2 devices=1 port="" timeout=60 max_restarts=${JALIGN_MAX_RESTARTS:-100}
while [ $# -gt 0 ]; do
  case "$1" in
    --processes) processes=${2:?}; shift 2 ;;
    --devices-per-process) devices=${2:?}; shift 2 ;;
    --port) port=${2:?}; shift 2 ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    --max-restarts) max_restarts=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || usage
case "$processes$devices" in *[!0-9]*) usage ;; esac
[ "$processes" -ge 1 ] && [ "$devices" -ge 1 ] || usage

jalign_cmd=${JALIGN:-$(command -v jalign || echo "$(dirname "$0")/../.venv/bin/jalign")}
python=${JALIGN_PYTHON:-$(dirname "$jalign_cmd")/python}
[ -x "$python" ] || python=python3
if [ -z "$port" ]; then  # a free port whose successor (the rendezvous) is free too
  port=$("$python" -c '
import socket
for _ in range(100):
    a = socket.socket(); a.bind(("127.0.0.1", 0)); p = a.getsockname()[1]
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", p + 1)); print(p); break
    except OSError: pass
    finally: a.close(); b.close()')
fi
# Each process gets K devices; any device count already in XLA_FLAGS is replaced.
xla_flags="$(echo "${XLA_FLAGS:-}" | sed 's/--xla_force_host_platform_device_count=[0-9]*//g') --xla_force_host_platform_device_count=$devices"

declare -a pids=()
stopping=0
forward() { stopping=1; for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done; }
trap forward TERM INT

start_all() {
  pids=()
  for ((i = 0; i < processes; i++)); do
    if [ "$i" -eq 0 ]; then
      env JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
        JALIGN_COORDINATOR="127.0.0.1:$port" JALIGN_NUM_PROCESSES="$processes" \
        JALIGN_PROCESS_ID=0 JALIGN_INIT_TIMEOUT="$timeout" "$jalign_cmd" train "$@" &
    else
      env JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
        JALIGN_COORDINATOR="127.0.0.1:$port" JALIGN_NUM_PROCESSES="$processes" \
        JALIGN_PROCESS_ID="$i" JALIGN_INIT_TIMEOUT="$timeout" "$jalign_cmd" train "$@" \
        > >(sed -u "s/^/[process $i] /") 2> >(sed -u "s/^/[process $i] /" >&2) &
    fi
    pids+=($!)
  done
}

# Waits for every process; the cluster's code: 0 when all finished, 75 when all saved on
# SIGTERM, else the first failure's code (the others are then stopped).
wait_all() {
  local rc code=-1 failed=0 finished p
  local -a live=("${pids[@]}")
  while [ "${#live[@]}" -gt 0 ]; do
    finished=""
    wait -n -p finished "${live[@]}"; rc=$?
    if [ -z "$finished" ]; then
      # A trapped signal interrupted `wait` (rc > 128): nothing finished. Otherwise bash
      # lost track of a child that already exited (127): find it by polling.
      [ "$rc" -gt 128 ] && continue
      for p in "${live[@]}"; do
        if ! kill -0 "$p" 2>/dev/null; then finished=$p; wait "$p"; rc=$?; break; fi
      done
      [ -z "$finished" ] && { sleep 0.2; continue; }
    fi
    local -a rest=()
    for p in "${live[@]}"; do [ "$p" != "$finished" ] && rest+=("$p"); done
    live=("${rest[@]}")
    if [ "$failed" -ne 0 ]; then
      continue  # stopped by us after the first failure
    elif [ "$rc" -ne 0 ] && [ "$rc" -ne 75 ]; then
      failed=$rc
      for p in "${live[@]}"; do kill -KILL "$p" 2>/dev/null; done
    elif [ "$code" -eq -1 ]; then
      code=$rc
    elif [ "$code" -ne "$rc" ]; then
      echo "launch/cpu_cluster.sh: processes disagree (exits $code and $rc)" >&2
      failed=1
    fi
  done
  [ "$failed" -ne 0 ] && return "$failed"
  return "$code"
}

restarts=0
while true; do
  start_all "$@"
  [ "$stopping" -eq 1 ] && forward  # a stop that came while the processes were starting
  wait_all; rc=$?
  if [ "$rc" -ne 75 ] || [ "$stopping" -eq 1 ]; then exit "$rc"; fi
  if [ "$restarts" -ge "$max_restarts" ]; then
    echo "launch/cpu_cluster.sh: preempted again after $restarts restarts; giving up" >&2
    exit "$rc"
  fi
  restarts=$((restarts + 1))
  echo "launch/cpu_cluster.sh: all $processes processes saved and exited 75 (preempted); restart $restarts/$max_restarts" >&2
done
