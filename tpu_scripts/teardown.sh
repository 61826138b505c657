#!/usr/bin/env bash
# Deletes the slice (and its queued resource). Billing stops only when this completes.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF2
Usage: tpu_scripts/teardown.sh [options]

Deletes the TPU VM slice --name; with --queued, deletes the queued resource and its slice
(queued-resources delete --force). Everything on the workers' disks is lost: keep run folders
and checkpoints on gs://, and fetch logs first (--fetch-logs).

Options:
  --fetch-logs RUN_NAME   first copy that run's per-worker logs here (tpu_scripts/logs.sh)
  --out DIR               where --fetch-logs puts them (default ./tpu-logs)
  --async                 return without waiting for the deletion to finish

$COMMON_HELP
EOF2
}

FETCH="" OUT=tpu-logs ASYNC=()
PASS=()
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  common_option "$@"
  if ((SHIFT)); then PASS+=("${@:1:SHIFT}"); shift "$SHIFT"; continue; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --fetch-logs) need_value "$@"; FETCH=$2; shift 2 ;;
    --out) need_value "$@"; OUT=$2; shift 2 ;;
    --async) ASYNC=(--async); shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
require_slice

if [[ -n $FETCH ]]; then
  "$TPU_SCRIPTS_DIR/logs.sh" "${PASS[@]}" --run-name "$FETCH" --out "$OUT" \
    || echo "# warning: fetching logs failed; deleting anyway" >&2
fi
if [[ $QUEUED == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$NAME" "${GFLAGS[@]}" --force --quiet \
    "${ASYNC[@]}"
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${GFLAGS[@]}" --quiet "${ASYNC[@]}"
fi
