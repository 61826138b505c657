"""Dynamic sampling (grpo.rollout_prompts, DAPO): more prompts rolled out than trained, the
groups whose rewards differ chosen for the update."""

import numpy as np
import pytest

from cqr_jax import config as C
from cqr_jax.sampler import Rollouts
from train import grpo, rollout_batch, steps


def test_select_groups_prefers_groups_whose_rewards_differ():
  r = np.array([[1, 1], [0, 2], [2, 2], [0, 1], [-0.1, 2]], np.float32).reshape(-1)
  np.testing.assert_array_equal(grpo.select_groups(r, 2, 2), [1, 3])
  np.testing.assert_array_equal(grpo.select_groups(r, 2, 3), [1, 3, 4])
  # too few groups differ: topped up with flat ones, in rollout order
  np.testing.assert_array_equal(grpo.select_groups(r, 2, 4), [0, 1, 3, 4])
  assert grpo.flat_fraction(r, 2) == pytest.approx(0.4)


def test_rollouts_take_keeps_each_prompts_rows_together():
  b, n, p, g = 3, 2, 4, 5
  rows = b * n
  roll = Rollouts(prompt_ids=np.arange(rows * p).reshape(rows, p),
                  prompt_mask=np.ones((rows, p), bool),
                  completion_ids=np.arange(rows * g).reshape(rows, g),
                  completion_mask=np.ones((rows, g), bool),
                  logprobs=np.zeros((rows, g), np.float32),
                  finish_reasons=[f"r{i}" for i in range(rows)],
                  texts=[f"t{i}" for i in range(rows)], n=n,
                  prompt_truncated=np.array([False, True, False]))
  sub = roll.take([2, 0])
  np.testing.assert_array_equal(sub.completion_ids, roll.completion_ids[[4, 5, 0, 1]])
  np.testing.assert_array_equal(sub.prompt_ids, roll.prompt_ids[[4, 5, 0, 1]])
  assert sub.texts == ["t4", "t5", "t0", "t1"] and sub.num_prompts == 2
  np.testing.assert_array_equal(sub.prompt_truncated, [False, False])


def test_the_update_gets_the_groups_whose_rewards_differ(tiny_llama_dir, tmp_path, monkeypatch):
  seen = {"rolls": [], "batches": []}
  real_update = steps.make_grpo_update

  def fake_score(ranker, roll, qids, turns, reward_cfg, step, n_steps, query_form="rewrite"):
    seen["rolls"].append(roll)
    # prompts 1 and 3 have rewards that differ; 0 and 2 are flat
    reward = np.array([1, 1, 0, 2, 2, 2, 0, 1], np.float32)
    return np.ones(8, bool), np.ones(8, np.int32), reward

  def recording(*args, **kw):
    update = real_update(*args, **kw)

    def call(state, batch):
      # each rollout's completion tokens back from the packed streams (their masked tokens)
      tokens = np.asarray(batch.tokens).reshape(batch.rollout.shape[:2] + (-1,))
      unpack = np.asarray(batch.unpack).reshape(tokens.shape[:2] + (-1,))
      comp = np.take_along_axis(tokens, unpack, -1).reshape(batch.unpack.shape)
      comp = np.where(np.asarray(batch.completion_mask()), comp, 0)
      seen["batches"].append({"completion": rollout_batch.per_rollout(
          batch, comp, len(np.asarray(batch.lengths))), "adv": np.asarray(batch.adv)})
      return update(state, batch)
    return call

  monkeypatch.setattr(grpo, "score_rollouts", fake_score)
  monkeypatch.setattr(steps, "make_grpo_update", recording)
  cfg = C.resolve("tiny", None, [
      f"model.source={tiny_llama_dir}", f"run_dir={tmp_path / 'run'}",
      "model.compute_dtype=float32", "mesh.fsdp=1", "grpo.steps=1", "grpo.batch_prompts=2",
      "grpo.rollout_prompts=4", "grpo.n=2", "grpo.micro_batch=2", "grpo.turns=all",
      "grpo.max_turns=0", "grpo.train_top_layers=0", "grpo.loss.kl_coef=0.0",
      "rollout.max_prompt_len=1024", "rollout.max_new_tokens=8"])
  _, history = grpo.train_grpo(cfg, init="initial")
  (roll,), (batch,) = seen["rolls"], seen["batches"]
  assert roll.num_prompts == 4
  chosen = roll.take([1, 3])
  want = np.where(chosen.completion_mask, chosen.completion_ids, 0)
  np.testing.assert_array_equal(batch["completion"].reshape(want.shape), want)
  # group advantages of the chosen groups' rewards (0, 2) and (0, 1): nonzero, opposite signs
  adv = batch["adv"].reshape(2, 2)
  assert np.all(adv[:, 0] < 0) and np.all(adv[:, 1] > 0)
  assert history[0]["groups_flat"] == pytest.approx(0.5)
  assert history[0]["trained_groups_flat"] == 0.0


def test_rollout_prompts_below_the_batch_is_refused():
  cfg = C.resolve("tiny", None, ["grpo.batch_prompts=4", "grpo.rollout_prompts=2"])
  with pytest.raises(ValueError, match="grpo.rollout_prompts=2 must be 0 or at least"):
    grpo.rollout_prompts(cfg)
