"""cqr_jax/input_cache.py: gs:// model and data inputs copied once per host (issue 32):
`model.source`, `retrieval.dense_model` and `data.dataset` folders.

The gs:// checks run in a subprocess against the local GCS emulator (tests/gcs_emulator.py),
with their own cache folder ($CQR_JAX_CACHE).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import gcs_emulator
from tests.multiprocess import REPO_ROOT


def test_local_paths_are_used_as_they_are(tmp_path):
  from cqr_jax import input_cache
  assert input_cache.local_folder(str(tmp_path)) == str(tmp_path)
  assert input_cache.local_file("x/model.gguf") == "x/model.gguf"
  d = input_cache.cache_dir("gs://b/models/m/")
  assert d == input_cache.cache_dir("gs://b/models/m")  # one copy per URI
  assert os.path.basename(d).startswith("m-") and d != input_cache.cache_dir("gs://c/models/m")


_SCRIPT = r"""
import json, os, subprocess, sys
from cqr_jax import input_cache, paths
from cqr_jax.data import load_dataset
from cqr_jax.data.synthetic import write_synthetic
from cqr_jax.data.types import DataError
tmp = sys.argv[1]
copies = []
real_copy = paths.copy
def counting_copy(src, dst):
  copies.append(src)
  with open(os.path.join(tmp, "copies.txt"), "a") as f:  # seen across forked processes
    f.write(src + "\n")
  real_copy(src, dst)
paths.copy = counting_copy

# A folder: copied once, then reused while its objects stay the same.
paths.write_text("gs://bkt/m/config.json", '{"a": 1}')
paths.write_text("gs://bkt/m/sub/w.bin", "0123456789")
d = input_cache.local_folder("gs://bkt/m")
assert d == input_cache.cache_dir("gs://bkt/m") and d.startswith(os.path.join(tmp, "cache"))
assert open(os.path.join(d, "config.json")).read() == '{"a": 1}'
assert open(os.path.join(d, "sub", "w.bin")).read() == "0123456789"
assert len(copies) == 2
assert input_cache.local_folder("gs://bkt/m/") == d and len(copies) == 2
# A changed object (same size, new generation): the whole copy is replaced.
paths.write_text("gs://bkt/m/config.json", '{"a": 2}')
assert input_cache.local_folder("gs://bkt/m") == d and len(copies) == 4
assert open(os.path.join(d, "config.json")).read() == '{"a": 2}'
inputs = os.path.dirname(d)
assert sorted(os.listdir(inputs)) == [os.path.basename(d), os.path.basename(d) + ".lock"]

# One file.
paths.write_text("gs://bkt/files/model.gguf", "GGUF")
f = input_cache.local_file("gs://bkt/files/model.gguf")
assert os.path.basename(f) == "model.gguf" and open(f).read() == "GGUF"
for call, uri, err in ((input_cache.local_folder, "gs://bkt/files/model.gguf", NotADirectoryError),
                       (input_cache.local_file, "gs://bkt/m", IsADirectoryError),
                       (input_cache.local_folder, "gs://bkt/nothing", FileNotFoundError),
                       (input_cache.local_file, "gs://bkt/nothing.gguf", FileNotFoundError)):
  try:
    call(uri)
    raise AssertionError(f"{call.__name__}({uri}) did not raise")
  except err as e:
    assert uri in str(e), e

# A copy that fails half way leaves nothing that looks whole; the next call copies again.
paths.write_text("gs://bkt/p/a.txt", "a")
paths.write_text("gs://bkt/p/b.txt", "b")
def failing_copy(src, dst):
  if src.endswith("b.txt"):
    raise OSError("network down")
  real_copy(src, dst)
paths.copy = failing_copy
try:
  input_cache.local_folder("gs://bkt/p")
  raise AssertionError("no error")
except OSError as e:
  assert "network down" in str(e)
p_dir = input_cache.cache_dir("gs://bkt/p")
assert not os.path.exists(p_dir)
assert not [n for n in os.listdir(inputs) if ".partial-" in n or ".old-" in n]
paths.copy = counting_copy
assert open(os.path.join(input_cache.local_folder("gs://bkt/p"), "b.txt")).read() == "b"

# Processes of one host at once: one of them copies, all get the copy.
for i in range(3):
  paths.write_text(f"gs://bkt/shared/f{i}.txt", str(i) * 1000)
open(os.path.join(tmp, "copies.txt"), "w").close()
child = ("import os, sys\n"
         "from cqr_jax import input_cache, paths\n"
         "real = paths.copy\n"
         "def copy(src, dst):\n"
         "  open(os.path.join(sys.argv[1], 'copies.txt'), 'a').write(src + '\\n')\n"
         "  real(src, dst)\n"
         "paths.copy = copy\n"
         "print(input_cache.local_folder('gs://bkt/shared'))\n")
procs = [subprocess.Popen([sys.executable, "-c", child, tmp], stdout=subprocess.PIPE, text=True)
         for _ in range(4)]
got = {p.communicate(timeout=120)[0].strip() for p in procs}
assert [p.returncode for p in procs] == [0] * 4
assert got == {input_cache.cache_dir("gs://bkt/shared")}
assert sorted(open(os.path.join(tmp, "copies.txt")).read().split()) == [
    f"gs://bkt/shared/f{i}.txt" for i in range(3)]

# A dataset folder on gs:// reads as the local one; its errors name the URI.
local = write_synthetic(os.path.join(tmp, "tiny"), size="tiny")
paths.copy_tree(local, "gs://bkt/data/tiny")
for split in ("train", "test"):
  a, b = load_dataset("gs://bkt/data/tiny", split), load_dataset(local, split)
  assert a.name == b.name == "tiny" and a.turns == b.turns and a.qrels == b.qrels
  assert list(a.collection.ids()) == list(b.collection.ids())
paths.copy_tree(local, "gs://bkt/data/bad")
paths.write_text("gs://bkt/data/bad/test/qrels.tsv", "q1\t0\tp1\n")
try:
  load_dataset("gs://bkt/data/bad", "test")
  raise AssertionError("no error")
except DataError as e:
  assert str(e).startswith("gs://bkt/data/bad/test/qrels.tsv:1: qrels line needs 4 fields"), e
try:
  load_dataset("topiocqa:gs://bkt/data/none", "train")
  raise AssertionError("no error")
except DataError as e:
  assert "gs://bkt/data/none: no such folder" in str(e), e

# model.source on gs://: a missing one is named.
from train import common
try:
  common.resolve_source("gs://bkt/models/none")
  raise AssertionError("no error")
except FileNotFoundError as e:
  assert "model.source='gs://bkt/models/none'" in str(e), e
assert common.resolve_source("gs://bkt/m") == ("hf", d)
# retrieval.dense_model on gs:// likewise.
from cqr_jax import config as cfglib
cfg = cfglib.resolve("tiny", None, ["retrieval.dense_model=gs://bkt/m"])
assert common.dense_model_dir(cfg) == d
try:
  common.dense_model_dir(cfglib.resolve("tiny", None, ["retrieval.dense_model=gs://bkt/none"]))
  raise AssertionError("no error")
except ValueError as e:
  assert "retrieval.dense_model='gs://bkt/none'" in str(e), e
print("OK", flush=True)
"""


@pytest.mark.skipif(not gcs_emulator.available(), reason="gcp-storage-emulator is not installed")
def test_gs_inputs_are_copied_once_and_kept_fresh(tmp_path):
  script = tmp_path / "inputs.py"
  script.write_text(_SCRIPT)
  with gcs_emulator.gcs_emulator("bkt") as gcs:
    env = {**os.environ, **gcs, "PYTHONPATH": REPO_ROOT, "JAX_PLATFORMS": "cpu",
           "CQR_JAX_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
