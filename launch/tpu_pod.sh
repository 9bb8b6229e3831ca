#!/usr/bin/env bash
# Run `jalign train ARGS...` on every worker of a Cloud TPU VM slice, from your machine:
#
#   launch/tpu_pod.sh --tpu my-v5e-16 --zone us-west4-a [--project P] \
#       configs/demo/sft_add.gin configs/hw/tpu_v5e_16.gin --gin "TrainConfig.steps=2000"
#
# Each attempt: (1) pack this checkout (`git ls-files`, working-tree contents) plus the named
# config files into a tarball, `gcloud compute tpus tpu-vm scp` it to every worker;
# (2) on every worker, unpack it into --workdir (default ~/jalign) and, once per
# pyproject.toml, create .venv and `pip install -e . jax[tpu]`; (3) on every worker, run
# `JALIGN_DISTRIBUTED=on .venv/bin/jalign train ARGS` (JAX finds its peers from the TPU
# metadata). gcloud exits with the first nonzero worker status (255 when ssh itself fails).
# Exit 75 (checkpoint saved on SIGTERM: preemption/maintenance) or 255 (the VM went away):
# wait until the TPU is READY again and start a new attempt, up to --max-restarts times.
# Any other exit code ends the launcher with that code.
#
# Config paths are relative to the checkout root (run this from there). Untracked files
# other than the named configs are not copied. --python picks the workers' interpreter
# (jalign needs Python >= 3.11; Ubuntu 22.04 TPU images ship 3.10). --dry-run prints each
# gcloud command (`+ ` then the shell-quoted argv) and runs nothing. Environment:
# JALIGN_SRC (checkout to copy; default the one holding this script),
# JALIGN_TPU_POLL_SECONDS (describe interval, 30), JALIGN_TPU_READY_TIMEOUT (3600).
# The ssh sessions carry the run: start this inside tmux/screen on a machine that stays up.
set -u
prog=launch/tpu_pod.sh
usage="usage: $prog --tpu NAME --zone ZONE [--project P] [--workdir DIR] [--python PY] [--max-restarts N] [--dry-run] CONFIG.gin [more.gin ...] [--gin BINDING ...]"
die_usage() { echo "$prog: $1; $usage" >&2; exit 2; }

tpu="" zone="" project="" workdir="~/jalign" python=python3 max_restarts=20 dry_run=0
while [ $# -gt 0 ]; do
  case $1 in
    --tpu|--zone|--project|--workdir|--python|--max-restarts)
      [ $# -ge 2 ] || die_usage "$1 needs a value"
      opt=${1#--}; val=$2; shift 2 ;;
    --tpu=*|--zone=*|--project=*|--workdir=*|--python=*|--max-restarts=*)
      opt=${1%%=*}; opt=${opt#--}; val=${1#*=}; shift ;;
    --dry-run) dry_run=1; shift; continue ;;
    --) shift; break ;;
    --gin|--gin=*) break ;;  # jalign's own arguments start here
    -*) die_usage "unknown option $1" ;;
    *) break ;;
  esac
  case $opt in
    tpu) tpu=$val ;; zone) zone=$val ;; project) project=$val ;; workdir) workdir=$val ;;
    python) python=$val ;; max-restarts) max_restarts=$val ;;
  esac
done
[ -n "$tpu" ] || die_usage "--tpu is required"
[ -n "$zone" ] || die_usage "--zone is required"
case $max_restarts in ''|*[!0-9]*) die_usage "--max-restarts takes a number" ;; esac

src=${JALIGN_SRC:-$(cd "$(dirname "$0")/.." && pwd)}
git -C "$src" rev-parse --git-dir >/dev/null 2>&1 || { echo "$prog: $src is not a git checkout" >&2; exit 2; }
# The config files among jalign's arguments (not --gin values): they must exist in the checkout.
configs=()
skip=0
for a in "$@"; do
  if [ "$skip" -eq 1 ]; then skip=0; continue; fi
  case $a in
    --gin) skip=1 ;;
    -*) ;;
    *) [ -f "$src/$a" ] || { echo "$prog: config $a not found under $src (give paths relative to the checkout root)" >&2; exit 2; }
       configs+=("$a") ;;
  esac
done
[ "${#configs[@]}" -gt 0 ] || die_usage "no CONFIG.gin given"

# Shell-quote each argument for a POSIX shell (plain when safe), joined by spaces.
q() {
  local a out=() sq="'" rep="'\\''"
  for a in "$@"; do
    if [[ -n $a && $a =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+=("$a"); else out+=("'${a//$sq/$rep}'"); fi
  done
  printf '%s' "${out[*]}"
}
# The workdir as the remote shell should see it: a leading ~ is the worker's $HOME.
case $workdir in
  "~") rdir='"$HOME"' ;;
  "~/"*) rdir='"$HOME"/'$(q "${workdir#\~/}") ;;
  *) rdir=$(q "$workdir") ;;
esac

where=(--zone "$zone")
[ -n "$project" ] && where+=(--project "$project")
archive="jalign-src-$tpu.tar.gz"  # scp puts a relative path in the worker's home directory
# pip runs again only when pyproject.toml (its dependencies) or the interpreter changes.
key="$(git -C "$src" hash-object "$src/pyproject.toml" 2>/dev/null || echo none) $python jax[tpu]"
setup="set -e; mkdir -p $rdir; cd $rdir; tar -xzf \"\$HOME\"/$(q "$archive"); rm -f \"\$HOME\"/$(q "$archive")"
# A run left over from a dropped ssh session still holds the TPU: SIGTERM it (it saves and
# exits 75) and wait for it to go before starting the next one.
setup+='; if [ -f .jalign-run.pid ] && ps -o args= -p "$(cat .jalign-run.pid)" 2>/dev/null | grep -q jalign; then'
setup+=' kill -TERM "$(cat .jalign-run.pid)"; while kill -0 "$(cat .jalign-run.pid)" 2>/dev/null; do sleep 1; done; fi'
setup+="; if [ \"\$(cat .venv/.jalign-install 2>/dev/null)\" != $(q "$key") ]; then $(q "$python") -m venv .venv;"
setup+=" .venv/bin/pip install -q -e . 'jax[tpu]'; echo $(q "$key") > .venv/.jalign-install; fi"
run="cd $rdir && echo \$\$ > .jalign-run.pid && JALIGN_DISTRIBUTED=on exec .venv/bin/jalign train $(q "$@")"

if [ "$dry_run" -eq 1 ]; then tarball=/tmp/jalign-src.tar.gz; else
  tmp=$(mktemp -d) || exit 1
  trap 'rm -rf "$tmp"' EXIT
  tarball=$tmp/src.tar.gz
fi
stopping=0
trap 'stopping=1' INT TERM  # Ctrl-C ends the gcloud command in the foreground, then the loop

g() {  # print a gcloud command (`+ ` and its quoted argv); run it unless --dry-run
  echo "+ $(q gcloud "$@")" >&"$log_fd"
  [ "$dry_run" -eq 1 ] && return 0
  gcloud "$@"
}
if [ "$dry_run" -eq 1 ]; then log_fd=1; else log_fd=2; fi

pack() {
  [ "$dry_run" -eq 1 ] && { echo "# pack: git ls-files of $src + ${configs[*]} -> $tarball"; return 0; }
  { git -C "$src" ls-files -z; printf '%s\0' "${configs[@]}"; } | sort -zu |
    while IFS= read -r -d '' f; do [ -e "$src/$f" ] && printf '%s\0' "$f"; done |
    tar -czf "$tarball" -C "$src" --null -T -
}

attempt() {
  g compute tpus tpu-vm scp "$tarball" "$tpu:$archive" "${where[@]}" --worker=all || return
  g compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all --command "$setup" || return
  g compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all --command "$run"
}

wait_ready() {  # poll the TPU's state until READY (or give up after the timeout)
  local poll=${JALIGN_TPU_POLL_SECONDS:-30} limit=${JALIGN_TPU_READY_TIMEOUT:-3600} start=$SECONDS state
  while :; do
    state=$(g compute tpus tpu-vm describe "$tpu" "${where[@]}" --format='value(state)') || state="(describe failed)"
    [ "$state" = READY ] && return 0
    [ "$stopping" -eq 1 ] && return 1
    case $state in PREEMPTED|TERMINATED)
      echo "$prog: TPU $tpu is $state: it only comes back if it is recreated under the same name" >&2 ;;
    esac
    if [ $((SECONDS - start)) -ge "$limit" ]; then
      echo "$prog: TPU $tpu still $state after ${limit}s; giving up" >&2; return 1
    fi
    echo "$prog: TPU $tpu is $state; waiting for READY" >&2
    sleep "$poll"
  done
}

pack || { echo "$prog: packing $src failed" >&2; exit 1; }
if [ "$dry_run" -eq 1 ]; then
  attempt
  echo "# on exit 75 or 255: $(q gcloud compute tpus tpu-vm describe "$tpu" "${where[@]}" --format='value(state)') until READY, then all of the above again"
  exit 0
fi
restarts=0
while true; do
  attempt; rc=$?
  [ "$stopping" -eq 1 ] && { echo "$prog: interrupted (exit $rc)" >&2; exit "$rc"; }
  case $rc in
    0) exit 0 ;;
    75) why="run saved and exited 75 (preempted)" ;;
    255) why="ssh to a worker failed (exit 255: VM gone or unreachable)" ;;
    *) exit "$rc" ;;
  esac
  if [ "$restarts" -ge "$max_restarts" ]; then
    echo "$prog: $why after $restarts restarts; giving up" >&2
    exit "$rc"
  fi
  restarts=$((restarts + 1))
  echo "$prog: $why; restart $restarts/$max_restarts once $tpu is READY" >&2
  wait_ready || exit "$rc"
done
