"""GRPO stops after K non-finite losses in a row, with a message naming the last good checkpoint,
which stays restorable (issue 6)."""

import dataclasses
import os

import jax.numpy as jnp
import pytest

from cqr_jax import config as C
from cqr_jax.checkpoint import Checkpointer
from train import grpo, steps


def test_k_nonfinite_losses_in_a_row_stop_the_run(tiny_llama_dir, tmp_path, monkeypatch):
  real = steps.make_grpo_update
  calls = []

  def poisoned(*args, **kw):
    update = real(*args, **kw)

    def call(state, batch):
      calls.append(1)
      if len(calls) >= 2:  # step 1 is clean; from step 2 on the reference log-probs are NaN
        batch = dataclasses.replace(batch, ref_logp=batch.ref_logp * jnp.nan)
      return update(state, batch)
    return call

  monkeypatch.setattr(steps, "make_grpo_update", poisoned)
  run_dir = tmp_path / "run"
  cfg = C.resolve("tiny", None, [
      f"model.source={tiny_llama_dir}", f"run_dir={run_dir}", "model.compute_dtype=float32",
      "mesh.fsdp=1", "grpo.steps=6", "grpo.save_every=1", "grpo.batch_prompts=2", "grpo.n=2",
      "grpo.micro_batch=4", "grpo.turns=all", "grpo.max_nonfinite=2", "grpo.train_top_layers=0",
      "grpo.loss.kl_coef=0.001",
      "rollout.max_prompt_len=1024", "rollout.max_new_tokens=8"])
  with pytest.raises(grpo.NonFiniteLossError,
                     match="2 non-finite losses in a row at step 3.*last good checkpoint is step 1"):
    grpo.train_grpo(cfg, init="initial")
  assert len(calls) == 3
  assert Checkpointer(os.path.join(run_dir, "grpo", "ckpt")).latest_step() == 1
