"""GRPO resume: a run killed with SIGKILL after a checkpoint, then resumed, ends with the same
parameters as an uninterrupted run of the same length (same seeds)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

STEPS = 4

CHILD = textwrap.dedent("""
    import os, sys
    # one device; LLVM level 0 as in tests/conftest.py (a tiny model: compile time dominates)
    os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=1 "
                               "--xla_backend_optimization_level=0")
    import jax, numpy as np
    from cqr_jax import config as C
    from train import common, grpo
    common.setup_logging()
    common.enable_compilation_cache()
    model_dir, run_dir, out = sys.argv[1:4]
    cfg = C.resolve("tiny", None, [
        f"model.source={model_dir}", f"run_dir={run_dir}", "model.compute_dtype=float32",
        "grpo.steps=%d", "grpo.save_every=1", "grpo.batch_prompts=2", "grpo.n=2",
        "grpo.micro_batch=4", "rollout.max_prompt_len=1024", "rollout.max_new_tokens=8",
        "grpo.lr=1e-3", "grpo.warmup_steps=0", "grpo.turns=all",
        # the paper's KL term (a reference pass) with a masked optimizer: top block only
        "grpo.loss.kl_coef=0.001", "grpo.train_top_layers=1"])
    state, _ = grpo.train_grpo(cfg, init="initial")
    flat = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]
    np.savez(out, *flat)
""" % STEPS)


def _run(args, **kw):
  # The three runs share one compilation cache (the CLI's default behaviour, here in the test's
  # own folder): the second and third load the first one's programs instead of compiling them.
  env = dict(os.environ, CQR_JAX_XLA_CACHE=os.path.join(os.path.dirname(args[1]), "xla_cache"))
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _params(path):
  with np.load(path) as z:
    return [z[k] for k in sorted(z.files, key=lambda s: int(s.split("_")[1]))]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tiny_llama_dir, tmp_path):
  straight = _run([tiny_llama_dir, str(tmp_path / "a"), str(tmp_path / "a.npz")])
  out, _ = straight.communicate(timeout=600)
  assert straight.returncode == 0, out.decode()[-3000:]

  run_b = tmp_path / "b"
  child = _run([tiny_llama_dir, str(run_b), str(tmp_path / "b.npz")])
  ckpt2 = run_b / "grpo" / "ckpt" / "2"
  deadline = time.time() + 600
  while not ckpt2.exists() and child.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert ckpt2.exists(), "no checkpoint at step 2 before the deadline"
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert not (tmp_path / "b.npz").exists()

  resumed = _run([tiny_llama_dir, str(run_b), str(tmp_path / "b.npz")])
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, out.decode()[-3000:]
  assert b"resumed GRPO from step" in out
  a, b = _params(tmp_path / "a.npz"), _params(tmp_path / "b.npz")
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
