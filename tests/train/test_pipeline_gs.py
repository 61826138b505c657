"""`cqr-jax pipeline` with everything in Cloud Storage (issue 32): the run folder, the model
(`model.source=gs://...`, an HF folder) and the data (`data.dataset=gs://...`, a generic folder),
served by the local GCS emulator (tests/gcs_emulator.py).

Preset `tiny` on a tiny random Llama (tests/train/conftest.py) and the embedded benchmark's tiny
size written as a generic folder, f32, SDPW settings that keep an SFT batch (as
tests/train/test_pod_cli.py). The same command on local folders is the reference: the report's
rows and table, the rewrites and the exported weights must be equal, and every file the local
run writes (but its console logs: a gs:// run logs to the console) must be on gs://. The second
run reuses the first one's compiled programs (one XLA cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import gcs_emulator
from tests.multiprocess import REPO_ROOT

pytestmark = [pytest.mark.slow,  # ~2-3 min on 2 cores: two tiny pipelines
              pytest.mark.skipif(not gcs_emulator.available(),
                                 reason="gcp-storage-emulator is not installed")]

SETS = ["model.compute_dtype=float32", "rollout.compute_dtype=float32",
        "data.max_train_turns=16", "sdpw.samples_per_turn=8", "sdpw.rank_threshold=100",
        "sdpw.max_new_tokens=16", "rollout.max_new_tokens=16", "eval.max_new_tokens=16"]
BUCKET = "gs://bkt"

# Copies between a local folder and gs:// (run with the emulator's environment).
_COPY = """
import os, sys
from cqr_jax import paths
src, dst = sys.argv[1], sys.argv[2]
if not paths.is_uri(src):
  paths.copy_tree(src, dst)
else:
  for f in paths.files_under(src):
    out = os.path.join(dst, f[len(src) + 1:])
    os.makedirs(os.path.dirname(out), exist_ok=True)
    paths.copy(f, out)
"""


def _env(extra: dict) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user
  return {**env, "PYTHONPATH": REPO_ROOT, **extra}


def _pipeline(run_dir: str, model: str, data: str, env: dict, log) -> None:
  argv = [sys.executable, "-m", "train.cli", "pipeline", "--preset", "tiny", "--run-dir", run_dir,
          "--set", f"model.source={model}", "--set", f"data.dataset={data}"]
  argv += [a for s in SETS for a in ("--set", s)]
  with open(log, "wb") as f:
    proc = subprocess.run(argv, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                          timeout=900, check=False)
  if proc.returncode:
    pytest.fail(f"pipeline on {run_dir} exited {proc.returncode}:\n"
                + log.read_text(errors="replace")[-4000:])


def _copy(src: str, dst: str, env: dict) -> None:
  subprocess.run([sys.executable, "-c", _COPY, src, dst], check=True, cwd=REPO_ROOT, env=env,
                 timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
  """(local run folder, the gs:// run folder copied back, the gs:// run's input cache)."""
  from cqr_jax.data.synthetic import write_synthetic
  tmp = tmp_path_factory.mktemp("pipeline_gs")
  data = write_synthetic(tmp / "tiny", size="tiny")
  common = {"CQR_JAX_XLA_CACHE": str(tmp / "xla")}
  _pipeline(str(tmp / "local"), tiny_llama_dir, data, _env(common), tmp / "local.log")
  with gcs_emulator.gcs_emulator("bkt") as gcs:
    env = _env({**common, **gcs, "CQR_JAX_CACHE": str(tmp / "cache")})
    _copy(tiny_llama_dir, f"{BUCKET}/models/tiny", env)
    _copy(data, f"{BUCKET}/data/tiny", env)
    _pipeline(f"{BUCKET}/runs/p", f"{BUCKET}/models/tiny", f"{BUCKET}/data/tiny", env,
              tmp / "gs.log")
    _copy(f"{BUCKET}/runs/p", str(tmp / "gs"), env)
  return tmp / "local", tmp / "gs", tmp / "cache"


def _files(root) -> set[str]:
  """Files under `root`; Orbax's and TensorBoard's (whose names hold hashes and times) as their
  checkpoint step's or event folder's name."""
  out = set()
  for r, _, fs in os.walk(root):
    for f in fs:
      parts = os.path.relpath(os.path.join(r, f), root).split(os.sep)
      if "ckpt" in parts:
        parts = parts[:parts.index("ckpt") + 2]
      elif "tb" in parts:
        parts = parts[:parts.index("tb") + 1]
      out.add("/".join(parts))
  return out


def test_the_run_folder_is_complete_on_gs(runs):
  local, gs, _ = runs
  expected = {f for f in _files(local) if not f.startswith("logs/")}
  assert {"config.yaml", "report/metrics.json", "report/metrics.md", "report/grpo_curves.png",
          "export/model.safetensors", "export/config.json", "sdpw/sft_data.jsonl",
          "grpo/metrics.jsonl", "sft/ckpt/1", "grpo/ckpt/2", "grpo/tb"} <= expected
  assert _files(gs) == expected
  assert json.loads((gs / "sdpw" / "summary.json").read_text())["kept"] >= 4  # SFT ran


def test_the_report_equals_the_local_run(runs):
  from train.evaluate import markdown_table
  local, gs, _ = runs

  def rows(d):
    out = json.loads((d / "report" / "metrics.json").read_text())["rows"]
    for r in out:
      r.pop("checkpoint", None)  # names the run folder
    return out

  a, b = rows(gs), rows(local)
  assert {r["system"] for r in b} >= {"zero_shot", "sft", "grpo", "baseline:raw"}
  assert a == b
  table = markdown_table(b)
  assert table in (gs / "report" / "metrics.md").read_text()
  assert table in (local / "report" / "metrics.md").read_text()
  for f in os.listdir(local / "report" / "rewrites"):
    assert (gs / "report" / "rewrites" / f).read_bytes() == (
        local / "report" / "rewrites" / f).read_bytes(), f


def test_the_export_equals_the_local_run_and_loads(runs):
  from safetensors.numpy import load_file
  from transformers import AutoTokenizer
  local, gs, _ = runs
  a, b = load_file(gs / "export" / "model.safetensors"), load_file(local / "export" /
                                                                    "model.safetensors")
  assert sorted(a) == sorted(b)
  for k in b:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  for f in ("config.json", "generation_config.json", "tokenizer.json"):
    assert (gs / "export" / f).read_bytes() == (local / "export" / f).read_bytes(), f
  assert AutoTokenizer.from_pretrained(str(gs / "export")).eos_token


def test_the_inputs_were_copied_once_into_the_cache(runs):
  from cqr_jax import input_cache
  _, gs, cache = runs
  log = (gs.parent / "gs.log").read_text(errors="replace")
  for uri in (f"{BUCKET}/models/tiny", f"{BUCKET}/data/tiny"):
    assert log.count(f"copied {uri} ") == 1, uri  # every stage of the pipeline uses the copy
  copies = sorted(os.listdir(cache / "inputs"))
  assert [c.rsplit("-", 1)[0] for c in copies if not c.endswith(".lock")] == ["tiny", "tiny"]
  for c in copies:
    if not c.endswith(".lock"):
      src = json.loads((cache / "inputs" / c / input_cache.SOURCE).read_text())
      assert src["uri"] in (f"{BUCKET}/models/tiny", f"{BUCKET}/data/tiny")
