#!/usr/bin/env bash
# Creates a TPU VM slice (single- or multi-host): directly, or through a queued resource.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: tpu_scripts/create.sh [options] [-- extra gcloud flags]

Creates the slice --name of --accelerator-type in --zone.
  direct:  gcloud compute tpus tpu-vm create NAME --accelerator-type T --version V
  queued:  gcloud compute tpus queued-resources create NAME --node-id NAME ... (waits in the
           queue until capacity frees up; the usual way to get multi-host and spot slices)

Options:
  --spot                   spot (preemptible) capacity: cheaper, can be reclaimed at any time;
                           save checkpoints often (Orbax to gs://) and relaunch after preemption
  --reserved               use the project's reservation
  --valid-until-duration D queued: give up if not provisioned within D (e.g. 6h)
  --wait                   queued: poll every 30 s until the slice is ACTIVE (fails on FAILED)
  --data-disk SOURCE       attach a persistent disk (read-only, e.g. a prebuilt index)

$COMMON_HELP

Example (multi-host v5e spot slice from the queue):
  tpu_scripts/create.sh --name cqr-v5e --zone us-east5-a --accelerator-type v5litepod-16 \\
    --queued --spot --wait
EOF
}

SPOT=0 RESERVED=0 VALID_UNTIL="" WAIT=0 DATA_DISK="" EXTRA=()
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  common_option "$@"
  if ((SHIFT)); then shift "$SHIFT"; continue; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --spot) SPOT=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --valid-until-duration) need_value "$@"; VALID_UNTIL=$2; shift 2 ;;
    --wait) WAIT=1; shift ;;
    --data-disk) need_value "$@"; DATA_DISK=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
require_slice
((SPOT && RESERVED)) && die "--spot and --reserved exclude each other"
[[ -z $VALID_UNTIL || $QUEUED == 1 ]] || die "--valid-until-duration needs --queued"

FLAGS=("${GFLAGS[@]}" --accelerator-type="$ACCELERATOR_TYPE")
((SPOT)) && FLAGS+=(--spot)
((RESERVED)) && FLAGS+=(--reserved)
[[ -n $DATA_DISK ]] && FLAGS+=(--data-disk="source=$DATA_DISK,mode=read-only")

note "slice $NAME: $ACCELERATOR_TYPE, $(hosts_for_type "$ACCELERATOR_TYPE") host(s)," \
  "runtime $RUNTIME_VERSION, zone $ZONE"
if [[ $QUEUED == 1 ]]; then
  [[ -n $VALID_UNTIL ]] && FLAGS+=(--valid-until-duration="$VALID_UNTIL")
  run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" \
    --runtime-version="$RUNTIME_VERSION" "${FLAGS[@]}" "${EXTRA[@]}"
  if ((WAIT)); then
    note "waiting for queued resource $NAME to become ACTIVE (polling every 30 s)"
    describe=(gcloud compute tpus queued-resources describe "$NAME" "${GFLAGS[@]}"
      --format='value(state.state)')
    if [[ $DRY_RUN == 1 ]]; then
      run "${describe[@]}"
    else
      while true; do
        state=$("${describe[@]}")
        echo "# $(date +%H:%M:%S) $NAME: $state" >&2
        case $state in
          ACTIVE) break ;;
          FAILED | SUSPENDED) die "queued resource $NAME is $state" ;;
        esac
        sleep 30
      done
    fi
  fi
else
  run gcloud compute tpus tpu-vm create "$NAME" --version="$RUNTIME_VERSION" "${FLAGS[@]}" \
    "${EXTRA[@]}"
fi
note "next: tpu_scripts/setup.sh --name $NAME --zone $ZONE (installs the project on every worker)"
