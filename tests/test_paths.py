"""cqr_jax.paths and the run-folder writers on a local disk and on gs:// (issue 32).

The gs:// half runs against the local GCS emulator (tests/gcs_emulator.py) in subprocesses,
which get the emulator's address in their environment: the same script on a local folder and on
gs://bkt/... must leave the same files with the same contents.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from cqr_jax import paths
from tests import gcs_emulator
from tests.multiprocess import REPO_ROOT, run_processes

needs_emulator = pytest.mark.skipif(not gcs_emulator.available(),
                                    reason="gcp-storage-emulator is not installed")


def test_local_paths_behave_as_the_os_module(tmp_path):
  d = str(tmp_path / "run")
  assert paths.absolute("rel/x") == os.path.abspath("rel/x")
  assert paths.absolute("gs://b/run/") == "gs://b/run" and paths.is_uri("gs://b/run")
  assert not paths.exists(d) and paths.listdir(d) == [] and not paths.nonempty_dir(d)
  paths.write_text(os.path.join(d, "a", "x.json"), "{}")  # parents created
  assert paths.read_text(os.path.join(d, "a", "x.json")) == "{}"
  assert not os.path.exists(os.path.join(d, "a", "x.json.tmp"))
  paths.append_text(os.path.join(d, "m.jsonl"), "1\n")
  with paths.open_append(os.path.join(d, "m.jsonl")) as f:
    f.write("2\n")
    paths.fsync(f)
  assert paths.read_text(os.path.join(d, "m.jsonl")) == "1\n2\n"
  assert sorted(paths.listdir(d)) == ["a", "m.jsonl"] and paths.nonempty_dir(d)
  assert paths.files_under(d) == [os.path.join(d, "a", "x.json"), os.path.join(d, "m.jsonl")]
  listing = paths.listing(d)
  assert sorted(listing) == [os.path.join("a", "x.json"), "m.jsonl"]
  assert listing["m.jsonl"]["size"] == 4 and listing["m.jsonl"]["version"]
  assert list(paths.listing(os.path.join(d, "m.jsonl"))) == ["m.jsonl"]
  assert paths.listing(str(tmp_path / "none")) == {}
  paths.copy_tree(d, str(tmp_path / "copy"))
  assert paths.files_under(str(tmp_path / "copy")) == [
      str(tmp_path / "copy" / "a" / "x.json"), str(tmp_path / "copy" / "m.jsonl")]
  paths.rmtree(d)
  assert not paths.exists(d)


# The writers of a run folder, run on ROOT (argv[1]); the files are then copied to argv[2].
_WRITERS = r"""
import json, os, sys
import numpy as np
root, out = sys.argv[1], sys.argv[2]
from cqr_jax import config as cfglib, paths
from cqr_jax.checkpoint import Checkpointer
from cqr_jax.data.trec import read_run, write_run
from cqr_jax.metrics_log import MetricsLogger, plot_curves, read_metrics
from train import common, runfolder, sdpw

cfg = cfglib.resolve("tiny", None, [f"run_dir={root}"])
runfolder.record(cfg)
assert runfolder.load_recorded(root) == cfg and runfolder.written(root) == []
d = common.stage_dir(cfg, "sdpw")
common.save_json(os.path.join(d, "summary.json"), {"kept": 1})
assert common.load_json(os.path.join(d, "summary.json")) == {"kept": 1}
with paths.open_append(os.path.join(d, sdpw.DONE_FILE)) as f:
  f.write(json.dumps({"qid": "a", "kept": True, "samples": 1, "reasons": []}) + "\n")
  paths.fsync(f)
  f.write('{"qid": "b", "ke')  # a torn line, repaired below
  f.flush()
assert list(sdpw.repair(d)) == ["a"]
assert runfolder.written(root) == ["sdpw"]
with MetricsLogger(os.path.join(root, "grpo")) as m:
  for step in (1, 2, 3):
    m.log(step, {"loss": 1.0 / step})
with MetricsLogger(os.path.join(root, "grpo"), resume_step=2) as m:  # step 3 is dropped
  m.log(3, {"loss": 0.25})
assert [r["loss"] for r in read_metrics(os.path.join(root, "grpo", "metrics.jsonl"))] == [
    1.0, 0.5, 0.25]
plot_curves(os.path.join(root, "grpo", "metrics.jsonl"), os.path.join(root, "report", "c.png"),
            ["loss"])
paths.makedirs(os.path.join(root, "eval"))
write_run(os.path.join(root, "eval", "run.trec"), {"q1": ["p2", "p1"]})
assert read_run(os.path.join(root, "eval", "run.trec")) == {"q1": {"p2": 199.0, "p1": 198.0}}
try:
  runfolder.guard_output(os.path.join(root, "eval"), False, "an evaluation")
  raise AssertionError("guard_output let an existing output be replaced")
except runfolder.RunFolderError:
  pass

with Checkpointer(os.path.join(root, "ckpt"), max_to_keep=2) as c:
  for step in (1, 2, 3):
    c.save(step, {"w": np.full((4, 2), step, np.float32)}, meta={"step": step, "final": step == 3})
  c.wait()
  assert c.directory == paths.absolute(os.path.join(root, "ckpt")) and c.all_steps() == [2, 3]
  assert c.meta(3) == {"step": 3, "final": True}
  step, state, meta = c.restore()
  assert step == 3 and np.all(np.asarray(state["w"]) == 3) and meta["step"] == 3
  c.keep_only(3)
  assert c.all_steps() == [3]

for f in paths.files_under(root):
  rel = f[len(root) + 1:]
  if "/tb/" in "/" + rel or "/ckpt/" in "/" + rel:  # event file names, Orbax's file names
    continue
  os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
  paths.copy(f, os.path.join(out, rel))
print("OK", flush=True)
"""


@needs_emulator
def test_run_folder_writers_leave_the_same_files_on_gs_as_on_disk(tmp_path):
  script = tmp_path / "writers.py"
  script.write_text(_WRITERS)
  env = {"CQR_JAX_XLA_CACHE": "off", "JAX_PLATFORMS": "cpu"}

  def run(root, out, extra=None):
    import subprocess
    proc = subprocess.run([sys.executable, str(script), root, str(out)], cwd=REPO_ROOT,
                          env={**os.environ, **env, **(extra or {}), "PYTHONPATH": REPO_ROOT},
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]

  run(str(tmp_path / "local"), tmp_path / "local_copy")
  with gcs_emulator.gcs_emulator("bkt") as gcs:
    run("gs://bkt/runs/r1", tmp_path / "gs_copy", gcs)
  local, remote = (paths.files_under(str(tmp_path / d)) for d in ("local_copy", "gs_copy"))
  def rel(fs, d):
    return [f[len(str(tmp_path / d)) + 1:] for f in fs]

  def text(p):
    return paths.read_text(p)

  assert rel(remote, "gs_copy") == rel(local, "local_copy")
  assert "config.yaml" in rel(local, "local_copy") and "report/c.png" in rel(local, "local_copy")
  for a, b in zip(local, remote):
    if a.endswith("config.yaml"):  # run_dir differs
      assert text(a).replace(str(tmp_path / "local"), "gs://bkt/runs/r1") == text(b)
    elif a.endswith("metrics.jsonl"):  # times differ
      rows = [[{k: v for k, v in json.loads(x).items() if k != "time"}
               for x in text(p).splitlines()] for p in (a, b)]
      assert rows[0] == rows[1]
    elif not a.endswith(".png"):
      assert paths.path(a).read_bytes() == paths.path(b).read_bytes(), a


_TWO_PROCESS_CKPT = r"""
import sys
import time
import numpy as np
from cqr_jax import distributed
distributed.initialize()
with distributed.fail_fast():
  import jax
  from cqr_jax.checkpoint import Checkpointer, abstract_like
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=distributed.interleaved())
  sh = jax.NamedSharding(mesh, jax.P("fsdp"))
  full = lambda v: np.arange(64, dtype=np.float32).reshape(16, 4) + v
  state = lambda v: {"w": jax.make_array_from_callback((16, 4), sh, lambda i: full(v)[i])}
  c = Checkpointer(sys.argv[1], max_to_keep=2)
  for s in (1, 2, 3):
    c.save(s, state(s), {"s": s})
  c.wait()
  assert c.all_steps() == [2, 3], c.all_steps()
  step, st, meta = c.restore(None, abstract_like(state(0)))
  assert step == 3 and meta == {"s": 3}, (step, meta)
  np.testing.assert_array_equal(distributed.allgather(st["w"]), full(3))
  if jax.process_index() == 1:  # a slower host: process 0 must not delete before it has listed
    time.sleep(3)
  c.keep_only(3)
  assert c.all_steps() == [3]
  c.close()
  distributed.sync("done")
  print("OK", jax.process_index(), flush=True)
"""


@needs_emulator
def test_two_processes_checkpoint_to_gs_with_an_interleaved_mesh(tmp_path):
  """Each process writes the shards its devices hold (every other row block) into one gs://
  folder; both restore and agree on the steps, also when one host reaches `keep_only` late."""
  script = tmp_path / "ckpt.py"
  script.write_text(_TWO_PROCESS_CKPT)
  with gcs_emulator.gcs_emulator("bkt") as gcs:
    results = run_processes([sys.executable, str(script), "gs://bkt/ckpt"], num_processes=2,
                            local_devices=4, timeout_s=300, env=gcs)
  assert [f"OK {r.process_id}" in r.stdout for r in results] == [True, True]
