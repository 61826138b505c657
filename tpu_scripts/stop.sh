#!/usr/bin/env bash
# Stops a run started by launch.sh on every worker (SIGTERM to its process group).
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF2
Usage: tpu_scripts/stop.sh [options] --run-name RUN_NAME

Sends SIGTERM (or --signal) to the process group recorded in worker-<i>.pid on every worker.
A multi-host run must be stopped on all workers: the others would wait in a collective.

Options:
  --run-name NAME   the run to stop; required
  --signal SIG      signal to send (default TERM; KILL if TERM is ignored)

$COMMON_HELP
EOF2
}

RUN_NAME="" SIGNAL=TERM
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  common_option "$@"
  if ((SHIFT)); then shift "$SHIFT"; continue; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --run-name) need_value "$@"; RUN_NAME=$2; shift 2 ;;
    --signal) need_value "$@"; SIGNAL=$2; shift 2 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n $RUN_NAME ]] || die "--run-name is required (see --help)"
[[ $SIGNAL =~ ^[A-Z0-9]+$ ]] || die "--signal '$SIGNAL': expected a name like TERM or KILL"
require_slice
LOGS=$(remote_path "$LOG_DIR/$RUN_NAME")
ssh_all "$WORKER_ID_SNIPPET; P=\$(cat $LOGS/worker-\$W.pid 2> /dev/null) || \
{ echo \"[worker \$W] no pid file\"; exit 0; }; kill -$SIGNAL -- -\$P 2> /dev/null \
|| kill -$SIGNAL \$P 2> /dev/null || true; echo \"[worker \$W] sent $SIGNAL to \$P\""
