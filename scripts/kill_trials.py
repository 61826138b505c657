"""Crash trials (issue 36): SIGKILL `cqr-jax <stage>` at seeded random moments, rerun it, and
check that the final outputs equal an uninterrupted run's.

  python scripts/kill_trials.py --work /tmp/trials --trials 10 --seed 0 --preset tiny

For each stage in order (sdpw, sft, grpo) the reference run's wall time T is measured; a trial
kills the stage after U(0.05, 0.95) * T seconds (if it is still running), reruns it to the end,
and goes on to the next stage in the same folder (a warm-up run first fills the XLA cache, so the
timed reference and the trials all load compiled programs). Compared: SDPW's three files byte for byte,
and the SFT / GRPO final checkpoints' arrays exactly. Every process shares one XLA cache; each
one's stderr is kept beside its run folder (`<work>/trial3-sft-killed.stderr`). Every process
imports the code afresh: run it from a tree nobody edits meanwhile (e.g. a `git archive` copy).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time

STAGES = ("sdpw", "sft", "grpo")


def run_stage(stage, run_dir, sets, env, kill_after=None):
  """(seconds, killed) of one `cqr-jax <stage>` process, SIGKILLed after `kill_after` s."""
  cmd = [sys.executable, "-m", "train.cli", stage, "--run-dir", run_dir] + sets
  # stderr to a file (progress bars and logs would fill a pipe nobody reads until exit)
  err_path = f"{run_dir.rstrip('/')}-{stage}-{'killed' if kill_after else 'full'}.stderr"
  t0 = time.time()
  with open(err_path, "w") as err:
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
      p.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
      p.send_signal(signal.SIGKILL)
      p.wait()
      return time.time() - t0, True
  if p.returncode != 0:
    with open(err_path) as err:
      raise SystemExit(f"{stage} in {run_dir} failed ({p.returncode}): {err.read()[-2000:]}")
  return time.time() - t0, False


def outputs(run_dir, stage):
  """What a stage leaves: file bytes (sdpw) or the final checkpoint's arrays (sft, grpo)."""
  import jax
  import numpy as np
  if stage == "sdpw":
    d = os.path.join(run_dir, "sdpw")
    return [open(os.path.join(d, f), "rb").read()
            for f in ("sft_data.jsonl", "done.jsonl", "summary.json")]
  from cqr_jax.checkpoint import Checkpointer
  step, state, _ = Checkpointer(os.path.join(run_dir, stage, "ckpt")).restore(None)
  return [step] + [np.asarray(x) for x in jax.tree.leaves(state["state"]["params"])]


def same(a, b) -> bool:
  import numpy as np
  return len(a) == len(b) and all(
      np.array_equal(x, y) if hasattr(x, "shape") else x == y for x, y in zip(a, b))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--work", required=True)
  ap.add_argument("--trials", type=int, default=10)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
  ap.add_argument("--set", action="append", default=[])
  a = ap.parse_args(argv)
  sets = ["--preset", a.preset] + [x for s in a.set for x in ("--set", s)]
  os.makedirs(a.work, exist_ok=True)
  env = dict(os.environ, CQR_JAX_XLA_CACHE=os.path.join(a.work, "xla"))
  ref_dir, wall = os.path.join(a.work, "reference"), {}
  for stage in a.stages:  # a warm-up run fills the XLA cache, so the timed reference is warm
    run_stage(stage, os.path.join(a.work, "warmup"), sets, env)
  for stage in a.stages:
    wall[stage], _ = run_stage(stage, ref_dir, sets, env)  # (the same preset: no change)
  ref = {s: outputs(ref_dir, s) for s in a.stages}
  failures = 0
  for i in range(a.trials):
    rng = random.Random(a.seed * 1000 + i)
    run_dir = os.path.join(a.work, f"trial{i}")
    for stage in a.stages:
      at = rng.uniform(0.05, 0.95) * wall[stage]
      _, killed = run_stage(stage, run_dir, sets, env, kill_after=at)
      run_stage(stage, run_dir, sets, env)
      ok = same(outputs(run_dir, stage), ref[stage])
      failures += not ok
      print(f"trial {i} {stage}: kill at {at:.1f}s of {wall[stage]:.1f}s "
            f"({'killed' if killed else 'finished first'}) -> {'equal' if ok else 'DIFFERENT'}",
            flush=True)
  print(f"{failures} of {a.trials * len(a.stages)} stage runs differ from the reference")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
