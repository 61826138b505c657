#!/usr/bin/env bash
# Fetches (or tails) the per-worker logs of a run started by launch.sh.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF2
Usage: tpu_scripts/logs.sh [options] --run-name RUN_NAME

Copies \$HOME/LOG_DIR/RUN_NAME/worker-<i>.log from every worker i to OUT/RUN_NAME/ here, one
gcloud scp per worker. Process 0 (worker 0) writes the run's metrics and reports to the run
folder; the other workers' logs are for errors and hangs.

Options:
  --run-name NAME   the run (as given to or printed by launch.sh); required
  --out DIR         local folder for the fetched logs (default ./tpu-logs)
  --tail N          instead of fetching, print the last N lines of every worker's log
  --worker I        only worker I (default: all)

$COMMON_HELP
EOF2
}

RUN_NAME="" OUT=tpu-logs TAIL="" ONLY=""
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  common_option "$@"
  if ((SHIFT)); then shift "$SHIFT"; continue; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --run-name) need_value "$@"; RUN_NAME=$2; shift 2 ;;
    --out) need_value "$@"; OUT=$2; shift 2 ;;
    --tail) need_value "$@"; TAIL=$2; shift 2 ;;
    --worker) need_value "$@"; ONLY=$2; shift 2 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n $RUN_NAME ]] || die "--run-name is required (see --help)"
[[ -z $TAIL || $TAIL =~ ^[0-9]+$ ]] || die "--tail '$TAIL': expected a number of lines"
[[ -z $ONLY || $ONLY =~ ^[0-9]+$ ]] || die "--worker '$ONLY': expected a worker index"
require_slice
LOGS=$(remote_path "$LOG_DIR/$RUN_NAME")

if [[ -n $TAIL ]]; then
  TAIL_CMD="$WORKER_ID_SNIPPET; tail -n $TAIL $LOGS/worker-\$W.log | sed \"s/^/[worker \$W] /\""
  if [[ -n $ONLY ]]; then ssh_one "$ONLY" "$TAIL_CMD"; else ssh_all "$TAIL_CMD"; fi
  exit 0
fi

if [[ -n $ONLY ]]; then
  WORKERS=("$ONLY")
else
  N=$(num_workers)
  mapfile -t WORKERS < <(seq 0 $((N - 1)))
fi
run mkdir -p "$OUT/$RUN_NAME"
for w in "${WORKERS[@]}"; do
  scp_from "$w" "$LOG_DIR/$RUN_NAME/worker-$w.log" "$OUT/$RUN_NAME/worker-$w.log"
done
note "fetched ${#WORKERS[@]} log(s) into $OUT/$RUN_NAME/"
