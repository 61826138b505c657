"""A simulated pod runs the CLI stages against a gs:// run folder (issue 32, "Must show").

`cqr-jax sdpw`, `sft`, `grpo` (2 steps), `evaluate` and `export` run as 2 processes x 4 CPU
devices (`--distributed`, tests/multiprocess.py) whose mesh interleaves the processes' devices
along the batch axis as a TPU slice's topology order does (`CQR_JAX_DEVICE_ORDER`,
train/common.py: owners 0,1,0,1 over the (data, fsdp) = (2, 2) batch devices, tensor 2 within a
process), with the run folder in a local GCS emulator (tests/gcs_emulator.py). The same commands
then run as 1 process x 8 devices on a local folder. Preset `tiny` with a tiny random Llama
(tests/train/conftest.py), f32 throughout, and enough SDPW samples that SFT gets a batch.

The pod's files must equal the single process's: SDPW's outputs byte for byte, the metrics, the
final SFT and GRPO checkpoints and the exported weights within the rounding of the
cross-process reductions (tolerances as tests/train/test_multihost.py), the evaluation table
exactly (its rewrites are sampled by the same keys from the same weights).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import gcs_emulator
from tests.multiprocess import REPO_ROOT, run_processes

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not gcs_emulator.available(),
                                 reason="gcp-storage-emulator is not installed")]

STAGES = ("sdpw", "sft", "grpo", "evaluate", "export")
SETS = ["model.compute_dtype=float32", "rollout.compute_dtype=float32", "data.size=tiny",
        "data.max_train_turns=16", "sdpw.samples_per_turn=8", "sdpw.rank_threshold=100",
        "sdpw.max_new_tokens=16", "rollout.max_new_tokens=16", "eval.max_new_tokens=16",
        "eval.seeds=0,", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
RUN = "gs://bkt/runs/pod"
RTOL, ATOL = 1e-5, 1e-6

# Copies a gs:// folder to a local one (run with the emulator's environment).
_DOWNLOAD = """
import os, sys
from cqr_jax import paths
src, dst = sys.argv[1], sys.argv[2]
for f in paths.files_under(src):
  out = os.path.join(dst, f[len(src) + 1:])
  os.makedirs(os.path.dirname(out), exist_ok=True)
  paths.copy(f, out)
"""


def _stages(run_dir: str, model: str, num_processes: int, env: dict) -> None:
  for stage in STAGES:
    argv = [sys.executable, "-m", "train.cli", stage, "--run-dir", run_dir, "--distributed"]
    if stage != "export":
      argv += ["--preset", "tiny", "--set", f"model.source={model}"]
      argv += [a for s in SETS for a in ("--set", s)]
    run_processes(argv, num_processes=num_processes, local_devices=8 // num_processes,
                  timeout_s=900, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
  """(pod folder copied from gs://, single-process folder)."""
  tmp = tmp_path_factory.mktemp("pod_cli")
  env = {"CQR_JAX_XLA_CACHE": str(tmp / "xla")}
  with gcs_emulator.gcs_emulator("bkt") as gcs:
    _stages(RUN, tiny_llama_dir, 2, {**env, **gcs, "CQR_JAX_DEVICE_ORDER": "interleave:2"})
    subprocess.run([sys.executable, "-c", _DOWNLOAD, RUN, str(tmp / "pod")], check=True,
                   cwd=REPO_ROOT, env={**os.environ, **gcs, "PYTHONPATH": REPO_ROOT}, timeout=300)
  _stages(str(tmp / "one"), tiny_llama_dir, 1, env)
  return tmp / "pod", tmp / "one"


def _metrics(path) -> list[dict]:
  return [{k: v for k, v in json.loads(x).items()
           if not (k.startswith("time") or k == "tokens_per_s")} for x in open(path)]


def _checkpoint(ckpt_dir) -> tuple[int, dict[str, np.ndarray]]:
  """The latest step's state as host arrays (read without a mesh)."""
  import jax
  import orbax.checkpoint as ocp
  step = max(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  path = os.path.join(str(ckpt_dir), str(step), "state")
  with ocp.PyTreeCheckpointer() as c:
    tree = c.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = c.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  return step, {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(state)}


def test_pod_on_gs_leaves_the_same_sdpw_outputs(runs):
  pod, one = runs
  for f in ("sft_data.jsonl", "done.jsonl", "summary.json", "random_state.json"):
    assert (pod / "sdpw" / f).read_bytes() == (one / "sdpw" / f).read_bytes(), f
  assert json.loads((one / "sdpw" / "summary.json").read_text())["kept"] >= 4  # an SFT batch
  config = (pod / "config.yaml").read_text().replace(RUN, str(one))
  assert config == (one / "config.yaml").read_text()


def test_pod_on_gs_trains_like_one_process(runs):
  pod, one = runs
  for stage, steps in (("sft", 1), ("grpo", 2)):
    a, b = _metrics(pod / stage / "metrics.jsonl"), _metrics(one / stage / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
      assert sorted(ra) == sorted(rb)
      for k in ra:
        np.testing.assert_allclose(ra[k], rb[k], rtol=RTOL, atol=ATOL, err_msg=f"{stage} {k}")
    (step_a, state_a), (step_b, state_b) = (_checkpoint(d / stage / "ckpt") for d in (pod, one))
    assert step_a == step_b == steps and sorted(state_a) == sorted(state_b)
    for k in state_b:
      np.testing.assert_allclose(state_a[k], state_b[k], rtol=RTOL, atol=ATOL, err_msg=k)
    assert os.listdir(pod / stage / "ckpt") == [str(steps)]  # the earlier steps were removed


def test_pod_on_gs_evaluates_and_exports_like_one_process(runs):
  pod, one = runs
  rows_a = json.loads((pod / "eval" / "grpo" / "metrics.json").read_text())
  rows_b = json.loads((one / "eval" / "grpo" / "metrics.json").read_text())
  for ra, rb in zip(rows_a, rows_b, strict=True):
    ra.pop("checkpoint", None), rb.pop("checkpoint", None)  # names the run folder
    assert ra == rb, ra["system"]
  for f in os.listdir(one / "eval" / "grpo"):
    if f.endswith((".trec", ".jsonl")):
      assert (pod / "eval" / "grpo" / f).read_bytes() == (one / "eval" / "grpo" / f).read_bytes()
  from safetensors.numpy import load_file
  assert sorted(os.listdir(pod / "export")) == sorted(os.listdir(one / "export"))
  a, b = load_file(pod / "export" / "model.safetensors"), load_file(one / "export" /
                                                                     "model.safetensors")
  assert sorted(a) == sorted(b)
  for k in b:
    np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL, err_msg=k)
  for f in ("config.json", "generation_config.json", "tokenizer.json"):
    assert (pod / "export" / f).read_bytes() == (one / "export" / f).read_bytes(), f
