#!/usr/bin/env bash
# Starts one `cqr-jax STAGE ... --distributed` process on every worker at once, a log per worker.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: tpu_scripts/launch.sh [options] STAGE [cqr-jax arguments...]

Runs 'cqr-jax STAGE [arguments...] --distributed' on every worker of the slice at the same
time (gcloud compute tpus tpu-vm ssh --worker=all). Every process calls
jax.distributed.initialize(), which finds the coordinator and the other workers by itself on
Cloud TPU. Every stage, export included, takes --distributed. First, on each worker, any
process that still holds the TPU (/dev/accel*, /dev/vfio/*: a crashed or stale run) is killed
and libtpu's lockfile (/tmp/libtpu_lockfile) removed. Each worker writes \$HOME/LOG_DIR/RUN_NAME/worker-<i>.log (i = the worker's index)
and worker-<i>.pid; fetch the logs with tpu_scripts/logs.sh --run-name RUN_NAME.

Everything from STAGE on goes to cqr-jax unchanged: use gs:// paths for the run folder and
for data that every worker reads, e.g.
  tpu_scripts/launch.sh --name cqr-v5e --zone us-east5-a --run-name grpo-qwen3b \\
    grpo --preset qwen2.5-3b-topiocqa-bm25 --run-dir gs://BUCKET/runs/grpo-qwen3b \\
    --set grpo.save_every=50

Options (before STAGE):
  --run-name NAME     names the log folder (default: STAGE-YYYYmmdd-HHMMSS)
  --env KEY=VALUE     environment variable for the run on every worker (repeatable), e.g.
                      --env LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true
  --foreground        wait for the run to end (ssh stays open; the exit code is the run's);
                      by default the run is detached (nohup setsid) and survives ssh
  --no-distributed    do not append --distributed (a single-host slice, or a debugging run)
  --no-clear-tpu      leave processes that hold the TPU and the libtpu lockfile alone

$COMMON_HELP
EOF
}

RUN_NAME="" ENVS=() FOREGROUND=0 DISTRIBUTED=1 CLEAR_TPU=1
while (($#)); do
  [[ $1 == --* ]] || break  # STAGE: the rest belongs to cqr-jax
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  common_option "$@"
  if ((SHIFT)); then shift "$SHIFT"; continue; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --run-name) need_value "$@"; RUN_NAME=$2; shift 2 ;;
    --env)
      need_value "$@"
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$2': expected KEY=VALUE"
      ENVS+=("$2"); shift 2 ;;
    --foreground) FOREGROUND=1; shift ;;
    --no-distributed) DISTRIBUTED=0; shift ;;
    --no-clear-tpu) CLEAR_TPU=0; shift ;;
    *) die "unknown option '$1' (see --help); options go before STAGE" ;;
  esac
done
(($#)) || die "missing STAGE (e.g. sft, grpo, evaluate); see --help"
require_slice
STAGE=$1
CQR_ARGS=("$@")
((DISTRIBUTED)) && CQR_ARGS+=(--distributed)
RUN_NAME=${RUN_NAME:-$STAGE-$(date +%Y%m%d-%H%M%S)}
[[ $RUN_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run-name '$RUN_NAME': letters, digits, _ . - only"

LOGS=$(remote_path "$LOG_DIR/$RUN_NAME")
CMD=$(join_quoted env "${ENVS[@]}" PYTHONUNBUFFERED=1 .venv/bin/cqr-jax "${CQR_ARGS[@]}")
LOG="$LOGS/worker-\$W.log"
PID="$LOGS/worker-\$W.pid"
PREFIX="set -e; mkdir -p $LOGS; $WORKER_ID_SNIPPET"
((CLEAR_TPU)) && PREFIX+="; $CLEAR_TPU_SNIPPET"
PREFIX+="; cd $(remote_path "$REMOTE_DIR")"
if ((FOREGROUND)); then
  REMOTE="$PREFIX; echo \$\$ > $PID; set +e; $CMD > $LOG 2>&1 < /dev/null; code=\$?; \
tail -n 5 $LOG | sed \"s/^/[worker \$W] /\"; exit \$code"
else
  REMOTE="$PREFIX; nohup setsid $CMD > $LOG 2>&1 < /dev/null & echo \$! > $PID; \
echo \"worker \$W: started pid \$(cat $PID), log $LOG\""
fi

note "run $RUN_NAME on every worker of $NAME ($(num_workers) host(s)): cqr-jax ${CQR_ARGS[*]}"
ssh_all "$REMOTE"
note "logs: tpu_scripts/logs.sh --name $NAME --zone $ZONE --run-name $RUN_NAME [--tail 50]"
note "stop: tpu_scripts/stop.sh --name $NAME --zone $ZONE --run-name $RUN_NAME"
