"""bench/memory_plan.py runs against the library as it is (issue 32), and the compiler's plan for
8 devices keeps batch rows sharded: SmolLM2-135M cut to 2 layers, the paper's batch (128 prompts
x 8 samples, 1,536 + 1,024 tokens), the GRPO update and the sampler each compiled (not run) for
one fake CPU device and for eight, with the same rows per micro-batch.

One device holds every row's activations: what each device would hold if the activations were
replicated. With the library's constraints each of eight devices holds an eighth of them, plus
its share of the state and a gathered layer or LM head at a time."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "memory_plan.py")
MICRO_ROWS = 32  # completions per micro-batch over the whole mesh
JOBS = [f"smollm2-135m:train:1,1,1:{MICRO_ROWS}", f"smollm2-135m:train:1,8,1:{MICRO_ROWS // 8}",
        "smollm2-135m:sampler:1,1,1", "smollm2-135m:sampler:1,8,1"]


@pytest.mark.slow
def test_memory_plan_keeps_rows_sharded(tmp_path):
  out = tmp_path / "plan.jsonl"
  run = subprocess.run([sys.executable, SCRIPT, "--jobs", ";".join(JOBS), "--num-layers", "2",
                        "--out", str(out), "--timeout", "240"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  results = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(results) == len(JOBS)
  errors = [r["error"] for r in results if "error" in r]
  assert not errors, errors
  by = {(r["program"], r["devices"]): r for r in results}

  # The update: one device runs all MICRO_ROWS rows of a micro-batch, each of eight its eighth.
  # Each device's temporaries must not come near the one device's (measured: 1/7), and must stay
  # under one micro-batch's attention scores (f32 [rows, heads, Lc, Lp + Lc]), which a device
  # that ran whole micro-batches would hold at least once (measured: half of that).
  one, eight = by["train", 1]["temp_size_in_bytes"], by["train", 8]["temp_size_in_bytes"]
  assert eight < one / 4, (one, eight)
  heads = 9  # SmolLM2-135M
  scores = MICRO_ROWS * heads * 1024 * (1536 + 1024) * 4
  assert eight < scores, (eight, scores)
  # The sampler: 1,024 rollouts' prompt pass and KV cache on one device, or an eighth on each
  # (measured: 1/8).
  one, eight = by["sampler", 1]["temp_size_in_bytes"], by["sampler", 8]["temp_size_in_bytes"]
  assert eight < one / 4, (one, eight)

  table = subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--table"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
  assert table.returncode == 0, table.stderr[-3000:]
  assert "| smollm2-135m | train | 4 seq / micro-batch / chip, 2 layers |" in table.stdout
