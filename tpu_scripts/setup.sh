#!/usr/bin/env bash
# Installs the project and its TPU extra on every worker of the slice (all at once).
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: tpu_scripts/setup.sh [options]

Puts the project in \$HOME/REMOTE_DIR on every worker and installs it there in a virtual
environment (\$HOME/REMOTE_DIR/.venv) with 'pip install -e .[tpu]'. The TPU images ship
Python 3.10 and the project needs >= 3.11, so the venv is made by uv with its own Python.

Source of the code (one of):
  --copy               (default) pack this checkout (git-tracked and untracked, not ignored
                       files) and scp it to every worker
  --git URL            git clone URL on every worker (or fetch, if already cloned)
  --ref REF            branch, tag or commit to check out with --git (default: main)

Options:
  --python VERSION     Python for the venv (default 3.12)
  --extras LIST        extras to install (default tpu)
  --check              afterwards, start JAX on all workers together and print each
                       worker's process index and device counts (a smoke test of the slice)

$COMMON_HELP
EOF
}

SOURCE=copy GIT_URL="" REF=main PYTHON=3.12 EXTRAS=tpu CHECK=0
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  common_option "$@"
  if ((SHIFT)); then shift "$SHIFT"; continue; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --copy) SOURCE=copy; shift ;;
    --git) need_value "$@"; SOURCE=git; GIT_URL=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --extras) need_value "$@"; EXTRAS=$2; shift 2 ;;
    --check) CHECK=1; shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
require_slice
D=$(remote_path "$REMOTE_DIR")

if [[ $SOURCE == copy ]]; then
  TARBALL=${TMPDIR:-/tmp}/cqr-jax-src-$NAME.tar.gz
  note "pack the checkout $REPO_ROOT (tracked + untracked, .gitignore respected)"
  if [[ $DRY_RUN == 1 ]]; then
    echo "git -C $(shell_quote "$REPO_ROOT") ls-files -z --cached --others --exclude-standard" \
      "| tar -czf $(shell_quote "$TARBALL") -C $(shell_quote "$REPO_ROOT") --null -T -"
  else
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard \
      | tar -czf "$TARBALL" -C "$REPO_ROOT" --null -T -
  fi
  scp_to_all "$TARBALL" cqr-jax-src.tar.gz
  ssh_all "set -e; mkdir -p $D && tar -xzf cqr-jax-src.tar.gz -C $D && rm cqr-jax-src.tar.gz"
else
  U=$(shell_quote "$GIT_URL") R=$(shell_quote "$REF")
  ssh_all "set -e; if [ -d $D/.git ]; then git -C $D fetch --all --tags; else git clone $U $D; \
fi; git -C $D checkout $R; git -C $D pull --ff-only || true"
fi

ssh_all "set -e; cd $D; python3 -m pip install --user --quiet --upgrade uv; \
export PATH=\$HOME/.local/bin:\$PATH; uv venv --allow-existing --python $(shell_quote "$PYTHON") \
.venv; uv pip install --python .venv/bin/python -e $(shell_quote ".[$EXTRAS]"); \
.venv/bin/cqr-jax --help > /dev/null && echo \"\$(hostname): cqr-jax installed\""

if ((CHECK)); then
  ssh_all "cd $D && .venv/bin/python -c 'from cqr_jax import distributed; \
distributed.initialize(); import jax; print(jax.process_index(), jax.process_count(), \
jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)'"
fi
note "next: tpu_scripts/data.sh (copy or mount data), then tpu_scripts/launch.sh"
