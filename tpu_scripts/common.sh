# Shared by every tpu_scripts/*.sh (sourced, not run): options, defaults, dry-run, gcloud helpers.
#
# Every option also reads an environment variable, so a session can `source my-slice.env`
# (see env.example) once and then call the scripts without repeating them.

# shellcheck disable=SC2034  # variables used by the scripts that source this file
set -euo pipefail

TPU_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$TPU_SCRIPTS_DIR/.." && pwd)

PROJECT=${CQR_TPU_PROJECT:-}
ZONE=${CQR_TPU_ZONE:-}
NAME=${CQR_TPU_NAME:-}
ACCELERATOR_TYPE=${CQR_TPU_TYPE:-v5litepod-16}
RUNTIME_VERSION=${CQR_TPU_RUNTIME:-}
NUM_WORKERS=${CQR_TPU_NUM_WORKERS:-}
QUEUED=${CQR_TPU_QUEUED:-0}
REMOTE_DIR=${CQR_TPU_REMOTE_DIR:-cqr-jax}
LOG_DIR=${CQR_TPU_LOG_DIR:-cqr-logs}
IAP=${CQR_TPU_IAP:-0}
DRY_RUN=${CQR_TPU_DRY_RUN:-0}

COMMON_HELP="Shared options (each also read from the environment variable in brackets):
  --project ID           GCP project [CQR_TPU_PROJECT]; default: gcloud's configured project
  --zone ZONE            zone, e.g. us-east5-a, us-central2-b [CQR_TPU_ZONE] (required)
  --name NAME            TPU VM name; also the queued resource's name [CQR_TPU_NAME] (required)
  --accelerator-type T   v5litepod-16, v4-32, v5p-32, v6e-16, ... [CQR_TPU_TYPE]
                         (default v5litepod-16)
  --runtime-version V    TPU software version [CQR_TPU_RUNTIME]; default by family:
                         v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                         v6e v2-alpha-tpuv6e
  --num-workers N        hosts in the slice [CQR_TPU_NUM_WORKERS]; default: asked from gcloud,
                         or (dry run) derived from the accelerator type
  --queued               the slice is (to be) a queued resource [CQR_TPU_QUEUED=1]
  --remote-dir DIR       project checkout on every worker, relative to \$HOME
                         [CQR_TPU_REMOTE_DIR] (default cqr-jax)
  --log-dir DIR          per-worker logs on every worker, relative to \$HOME
                         [CQR_TPU_LOG_DIR] (default cqr-logs)
  --iap                  ssh/scp through IAP (workers without external IPs) [CQR_TPU_IAP=1]
  --dry-run              print the commands instead of running them; needs no gcloud
                         [CQR_TPU_DRY_RUN=1]
  -h, --help             this help"

die() {
  echo "error: $*" >&2
  exit 2
}

# shell_quote WORD: WORD quoted for a POSIX shell (same rule as Python's shlex.quote).
shell_quote() {
  local s=$1
  if [[ -z $s ]]; then
    printf "''"
  elif [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\"\'\"\'}"
  fi
}

# join_quoted ARGS...: one shell command line.
join_quoted() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(shell_quote "$a")"
  done
  printf '%s' "$out"
}

# run CMD ARGS...: runs the command, or prints it (one line, shell-quoted) in a dry run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    join_quoted "$@"
    echo
  else
    echo "+ $(join_quoted "$@")" >&2
    "$@"
  fi
}

# note TEXT: a comment in the dry-run output / a progress line otherwise.
note() {
  if [[ $DRY_RUN == 1 ]]; then echo "# $*"; else echo "# $*" >&2; fi
}

# common_option "$@": if $1 is a shared option, applies it and sets SHIFT to the number of
# arguments it used; otherwise SHIFT=0. Callers split `--opt=value` first (see the scripts).
common_option() {
  SHIFT=0
  case $1 in
    --project) need_value "$@"; PROJECT=$2; SHIFT=2 ;;
    --zone) need_value "$@"; ZONE=$2; SHIFT=2 ;;
    --name) need_value "$@"; NAME=$2; SHIFT=2 ;;
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; SHIFT=2 ;;
    --runtime-version) need_value "$@"; RUNTIME_VERSION=$2; SHIFT=2 ;;
    --num-workers) need_value "$@"; NUM_WORKERS=$2; SHIFT=2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2; SHIFT=2 ;;
    --log-dir) need_value "$@"; LOG_DIR=$2; SHIFT=2 ;;
    --queued) QUEUED=1; SHIFT=1 ;;
    --iap) IAP=1; SHIFT=1 ;;
    --dry-run) DRY_RUN=1; SHIFT=1 ;;
  esac
}

need_value() {
  [[ $# -ge 2 && $2 != --* ]] || die "option $1 needs a value (see --help)"
}

# require_slice: checks the options every gcloud call needs and fills the defaults.
require_slice() {
  [[ -n $NAME ]] || die "--name (or CQR_TPU_NAME) is required"
  [[ -n $ZONE ]] || die "--zone (or CQR_TPU_ZONE) is required"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "--name '$NAME': lowercase letters, digits and '-', starting with a letter"
  if [[ -z $RUNTIME_VERSION ]]; then RUNTIME_VERSION=$(default_runtime "$ACCELERATOR_TYPE"); fi
  GFLAGS=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then GFLAGS+=(--project="$PROJECT"); fi
  SSH_FLAGS=()
  if [[ $IAP == 1 ]]; then SSH_FLAGS+=(--tunnel-through-iap); fi
}

# default_runtime TYPE: the TPU software version for an accelerator family.
default_runtime() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "unknown accelerator type '$1' (expected v4-N, v5litepod-N, v5p-N, v6e-N); \
pass --runtime-version explicitly" ;;
  esac
}

# hosts_for_type TYPE: hosts (TPU VM workers) of a slice, from its accelerator type.
#   v2/v3: N TensorCores, 8 per host. v4/v5p: N TensorCores = N/2 chips, 4 chips per host.
#   v5e/v6e: N chips; up to 8 on one host, else 4 per host.
hosts_for_type() {
  local t=$1 n=${1##*-}
  [[ $n =~ ^[0-9]+$ ]] || die "accelerator type '$t' does not end in a number"
  case $t in
    v2-* | v3-*) echo $(((n + 7) / 8)) ;;
    v4-* | v5p-*) echo $(((n / 2 + 3) / 4)) ;;
    v5litepod-* | v5e-* | v6e-*) if ((n <= 8)); then echo 1; else echo $((n / 4)); fi ;;
    *) die "unknown accelerator type '$t'; pass --num-workers" ;;
  esac
}

# num_workers: --num-workers, else the slice's endpoints from gcloud, else the type's default.
num_workers() {
  if [[ -n $NUM_WORKERS ]]; then
    echo "$NUM_WORKERS"
  elif [[ $DRY_RUN == 1 ]]; then
    hosts_for_type "$ACCELERATOR_TYPE"
  else
    local ips
    ips=$(gcloud compute tpus tpu-vm describe "$NAME" "${GFLAGS[@]}" \
      --format='value(networkEndpoints[].ipAddress)')
    [[ -n $ips ]] || die "could not read the workers of '$NAME' from gcloud; pass --num-workers"
    echo "$ips" | tr ';' '\n' | grep -c .
  fi
}

# ssh_all CMD: runs the shell command CMD on every worker of the slice at once.
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GFLAGS[@]}" --worker=all "${SSH_FLAGS[@]}" \
    --command "$1"
}

# ssh_one WORKER CMD
ssh_one() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GFLAGS[@]}" --worker="$1" "${SSH_FLAGS[@]}" \
    --command "$2"
}

# scp_to_all LOCAL REMOTE: copies LOCAL to REMOTE (relative to $HOME) on every worker.
scp_to_all() {
  run gcloud compute tpus tpu-vm scp "$1" "$NAME:$2" "${GFLAGS[@]}" --worker=all "${SSH_FLAGS[@]}"
}

# scp_from WORKER REMOTE LOCAL
scp_from() {
  run gcloud compute tpus tpu-vm scp "$NAME:$2" "$3" "${GFLAGS[@]}" --worker="$1" \
    "${SSH_FLAGS[@]}"
}

# remote_path PATH: PATH for a remote shell command; relative paths are under $HOME.
remote_path() {
  # shellcheck disable=SC2016  # $HOME is for the remote shell
  if [[ $1 == /* ]]; then shell_quote "$1"; else printf '$HOME/%s' "$(shell_quote "$1")"; fi
}

# Remote shell snippet: stops whatever still holds this worker's TPU (a crashed or stale run
# keeps /dev/accel* on v4, /dev/vfio/* on v5e/v5p/v6e) and removes libtpu's lockfile, so the new
# run can open the chips. Needs $W (WORKER_ID_SNIPPET) for its messages.
CLEAR_TPU_SNIPPET="holders=\$( (sudo lsof -t /dev/accel* /dev/vfio/* 2> /dev/null \
|| sudo fuser /dev/accel* /dev/vfio/* 2> /dev/null) | tr -s ' ' '\\n' | grep -E '^[0-9]+\$' \
| sort -u); for p in \$holders; do echo \"[worker \$W] stopping pid \$p, which holds the TPU\"; \
sudo kill -9 \$p || true; done; sudo rm -f /tmp/libtpu_lockfile"

# Remote shell snippet: this worker's index (0..N-1) from the TPU VM metadata server.
METADATA_URL=http://metadata.google.internal/computeMetadata/v1/instance/attributes
WORKER_ID_SNIPPET="W=\$(curl -sf -H Metadata-Flavor:Google $METADATA_URL/agent-worker-number \
|| hostname)"
