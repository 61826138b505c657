#!/usr/bin/env bash
# Shows the slice (and its queued resource) and, per worker, whether cqr-jax is running.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF2
Usage: tpu_scripts/status.sh [options] [--run-name RUN_NAME]

Prints the queued resource's state (with --queued), the TPU VM's state and health, and with
--run-name, on every worker: whether the run's process is alive and its last log lines.

Options:
  --run-name NAME   also check this run on every worker
  --lines N         log lines to show per worker (default 3)

$COMMON_HELP
EOF2
}

RUN_NAME="" LINES=3
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  common_option "$@"
  if ((SHIFT)); then shift "$SHIFT"; continue; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --run-name) need_value "$@"; RUN_NAME=$2; shift 2 ;;
    --lines) need_value "$@"; LINES=$2; shift 2 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines '$LINES': expected a number"
require_slice

if [[ $QUEUED == 1 ]]; then
  run gcloud compute tpus queued-resources describe "$NAME" "${GFLAGS[@]}" \
    --format='table(name.basename(),state.state,tpu.nodeSpec[0].node.acceleratorType)'
fi
FIELDS="name.basename(),state,health,acceleratorType,runtimeVersion"
run gcloud compute tpus tpu-vm describe "$NAME" "${GFLAGS[@]}" \
  --format="table($FIELDS,networkEndpoints.len():label=WORKERS)"
if [[ -n $RUN_NAME ]]; then
  LOGS=$(remote_path "$LOG_DIR/$RUN_NAME")
  ssh_all "$WORKER_ID_SNIPPET; P=\$(cat $LOGS/worker-\$W.pid 2> /dev/null || echo none); \
if [ \$P != none ] && kill -0 \$P 2> /dev/null; then S=running; else S=stopped; fi; \
echo \"[worker \$W] pid \$P \$S\"; tail -n $LINES $LOGS/worker-\$W.log 2> /dev/null \
| sed \"s/^/[worker \$W] /\""
fi
