"""Training the top N blocks only: frozen leaves never move, trainable leaves get the full model's
gradient, and the backward pass skips the frozen blocks (fewer FLOPs in the compiled update)."""

import dataclasses
import os

import jax
import numpy as np
import optax
import pytest

from cqr_jax import partial_training, sharding
from cqr_jax.models.config import ModelConfig
from cqr_jax.objectives import grpo as grpo_obj
from cqr_jax.testing import random_rollouts, rollout_rows
from train import rollout_batch, steps

CFG = ModelConfig(family="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64,
                  num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                  tie_word_embeddings=True, bos_token_id=None, eos_token_id=1)


def make_batch(seed, kind="grpo", mesh=None):
  """GRPO: a packed rollout batch (4 prompts x 2 samples) with random advantages and reference
  log-probs; SFT: the same sequences as flat rows prompt ++ completion."""
  roll = random_rollouts(seed, CFG.vocab_size, prompts=4, n=2)
  if kind == "sft":
    return {k: rollout_batch.place(v, mesh) for k, v in rollout_rows(roll).items()}
  rng = np.random.default_rng(seed)
  batch = rollout_batch.grpo_batch(roll, mesh, micro_batch=4)
  rows, lc = roll.completion_ids.shape
  adv = rng.normal(size=rows).astype(np.float32)
  ref = rng.normal(-3.0, 0.5, (rows, lc)).astype(np.float32)
  return dataclasses.replace(batch, adv=rollout_batch.place_replicated(adv, mesh),
                             ref_logp=batch.per_slot(jax.numpy.asarray(ref)))


def _flat(tree):
  return {jax.tree_util.keystr(p): v if isinstance(v, str) else np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_labels_mark_top_blocks_and_final_norm():
  model = sharding.create_model(CFG, None, seed=0)
  _, params, _ = steps.split_model(model)
  labs = _flat(partial_training.labels(params, 1))
  train = sorted(k for k, v in labs.items() if v == "train")
  assert train and all("final_norm" in k or "[3]" in k for k in train), train
  assert any("final_norm" in k for k in train)
  assert all(labs[k] == "frozen" for k in labs if "embed" in k or "[0]" in k)
  assert set(_flat(partial_training.labels(params, 0)).values()) == {"train"}
  with pytest.raises(ValueError, match="exceeds the model's 4 blocks"):
    partial_training.labels(params, 5)


def _one_update(cfg, top_layers, batch, kind="grpo"):
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  model = sharding.create_model(cfg, mesh, seed=0)
  graphdef, params, rest = steps.split_model(model)
  before = _flat(params)
  # sgd(1) + weight decay shows both a gradient step and decay on the leaves that train
  tx = partial_training.mask_optimizer(
      optax.chain(optax.add_decayed_weights(0.1), optax.sgd(1.0)), top_layers)
  state = steps.init_state(params, tx)
  if kind == "grpo":
    update = steps.make_grpo_update(graphdef, rest, tx, grpo_obj.GRPOLossConfig(),
                                    temperature=0.7, micro_batch=4, mesh=mesh,
                                    top_layers=top_layers)
  else:
    update = steps.make_sft_update(graphdef, rest, tx, micro_batch=4, mesh=mesh,
                                   top_layers=top_layers)
  state, m = update(state, batch)
  return before, _flat(jax.device_get(state.params)), jax.device_get(m)


@pytest.mark.parametrize("scan,kind", [(True, "grpo"), (False, "sft")])
def test_frozen_leaves_stay_and_top_leaves_get_the_full_gradient(scan, kind):
  cfg = dataclasses.replace(CFG, scan_layers=scan)
  batch = make_batch(3, kind)
  before, full, m_full = _one_update(cfg, 0, batch, kind)
  _, part, m_part = _one_update(cfg, 2, batch, kind)
  np.testing.assert_allclose(m_part["loss"], m_full["loss"], rtol=1e-6)
  moved = 0
  for k, v in part.items():
    if "final_norm" in k or "[2]" in k or "[3]" in k:
      # d loss / d top params does not depend on freezing what lies below them
      np.testing.assert_allclose(v, full[k], rtol=2e-5, atol=1e-6, err_msg=k)
      moved += not np.array_equal(v, before[k])
    else:
      np.testing.assert_array_equal(v, before[k], err_msg=k)
      assert not np.array_equal(full[k], before[k]), k  # the full run did move it
  assert moved > 0


def test_backward_skips_frozen_blocks():
  """The compiled update's FLOPs (XLA cost analysis, unrolled blocks) drop with 1 of 4 blocks
  trainable: the frozen blocks run forward once, without remat or a backward pass."""
  cfg = dataclasses.replace(CFG, scan_layers=False, remat="full")
  batch = rollout_rows(random_rollouts(1, CFG.vocab_size, prompts=4, n=2))

  def flops(top):
    model = sharding.create_model(cfg, None, seed=0)
    graphdef, params, rest = steps.split_model(model)

    def loss(p):
      logp = steps._target_logprobs(graphdef, rest, p, batch["tokens"], batch["mask"], 1.0,
                                    False, None, top)
      return (logp * batch["loss_mask"][:, 1:]).sum()

    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]

  full, top1 = flops(0), flops(1)
  assert top1 < 0.6 * full, (top1, full)


def test_stage_params_restore_whatever_optimizer_trained_them(tmp_path):
  """Evaluation and GRPO read a stage's parameters from its checkpoint without rebuilding the
  optimizer that stage ran with: a checkpoint of a masked (top-2) AdamW restores under a config
  whose optimizer would be a different tree."""
  from cqr_jax import config as cfglib
  from cqr_jax.checkpoint import Checkpointer
  from train import common
  _, params, _ = steps.split_model(sharding.create_model(CFG, None, seed=0))
  state = steps.init_state(params, partial_training.mask_optimizer(optax.adamw(1e-3), 2))
  cfg = cfglib.resolve("tiny", None, [f"run_dir={tmp_path}", "sft.train_top_layers=0"])
  ckpt = Checkpointer(os.path.join(str(tmp_path), "sft", "ckpt"))
  ckpt.save(3, {"state": {"params": state.params, "opt_state": state.opt_state,
                          "step": state.step}}, meta={}, force=True)
  ckpt.wait()
  _, fresh, _ = steps.split_model(sharding.create_model(CFG, None, seed=1))
  step, restored = common.restore_stage_params(cfg, "sft", fresh)
  assert step == 3
  for k, v in _flat(restored).items():
    np.testing.assert_array_equal(v, _flat(params)[k], err_msg=k)
