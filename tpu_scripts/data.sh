#!/usr/bin/env bash
# Moves data between here, Cloud Storage and the workers' disks.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: tpu_scripts/data.sh [options] COMMAND ARGS

Commands:
  upload LOCAL gs://BUCKET/PATH   copy a local file or folder to Cloud Storage (runs here)
  copy gs://BUCKET/PATH DIR       copy from Cloud Storage to DIR on every worker at once
                                  (DIR relative to \$HOME unless absolute); use it for what is
                                  read often: the BM25 index, dense embeddings, tokenizer, model
  mount BUCKET DIR                mount a bucket with gcsfuse at DIR on every worker (installs
                                  gcsfuse when missing); fine for datasets read once per epoch.
                                  Mounted with --implicit-dirs and --rename-dir-limit=200000
                                  (Orbax finishes a checkpoint by renaming its folder)

Run folders and checkpoints need neither: pass gs:// paths to cqr-jax directly (--run-dir
gs://BUCKET/runs/NAME); Orbax and the readers open gs:// through etils.epath.

$COMMON_HELP
EOF
}

ARGS=()
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  common_option "$@"
  if ((SHIFT)); then shift "$SHIFT"; continue; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --*) die "unknown option '$1' (see --help)" ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
((${#ARGS[@]} == 3)) || die "expected COMMAND and two arguments, got '${ARGS[*]:-}' (see --help)"
CMD=${ARGS[0]} SRC=${ARGS[1]} DST=${ARGS[2]}

case $CMD in
  upload)
    [[ $DST == gs://* ]] || die "upload: destination '$DST' must be a gs:// path"
    run gcloud storage cp --recursive "$SRC" "$DST"
    ;;
  copy)
    require_slice
    [[ $SRC == gs://* ]] || die "copy: source '$SRC' must be a gs:// path"
    ssh_all "set -e; mkdir -p $(shell_quote "$DST"); gcloud storage cp --recursive \
$(shell_quote "$SRC") $(shell_quote "$DST")"
    ;;
  mount)
    require_slice
    BUCKET=${SRC#gs://}
    [[ $BUCKET =~ ^[a-z0-9][-a-z0-9_.]*$ ]] || die "mount: '$SRC' is not a bucket name"
    ssh_all "set -e; if ! command -v gcsfuse > /dev/null; then \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
| sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null; \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] \
https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null; \
sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi; \
mkdir -p $(shell_quote "$DST"); mountpoint -q $(shell_quote "$DST") \
|| gcsfuse --implicit-dirs --rename-dir-limit=200000 $(shell_quote "$BUCKET") \
$(shell_quote "$DST")"
    ;;
  *) die "unknown command '$CMD' (upload, copy or mount)" ;;
esac
