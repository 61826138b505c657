"""The jitted GRPO/SFT updates: exact micro-batch accumulation, and 8 devices == 1 device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cqr_jax import sharding
from cqr_jax.models.config import ModelConfig
from cqr_jax.objectives import grpo as grpo_obj
from train import rollout_batch, steps

CFG = ModelConfig(family="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=1)


def make_batch(seed=0, b=8, p=6, g=10):
  rng = np.random.default_rng(seed)
  plen = rng.integers(2, p + 1, b)
  glen = rng.integers(1, g + 1, b)
  tokens = rng.integers(2, CFG.vocab_size, (b, p + g)).astype(np.int32)
  mask = np.zeros((b, p + g), bool)
  loss = np.zeros((b, p + g), bool)
  for i in range(b):
    mask[i, p - plen[i]:p + glen[i]] = True
    loss[i, p:p + glen[i]] = True
  ref = rng.normal(-3.0, 0.5, (b, p + g - 1)).astype(np.float32)
  adv = rng.normal(size=b).astype(np.float32)
  return {"tokens": tokens, "mask": mask, "loss_mask": loss, "ref_logp": ref, "adv": adv}


def run_update(mesh, batch, micro_batch, loss_cfg=grpo_obj.GRPOLossConfig(), cfg=CFG,
               response_len=None):
  model = sharding.create_model(cfg, mesh, seed=0)
  graphdef, params, rest = steps.split_model(model)
  tx = optax.sgd(1.0)  # params - grads: compares the gradients (Adam's first step is ~sign(g))
  state = steps.init_state(params, tx)
  update = steps.make_grpo_update(graphdef, rest, tx, loss_cfg, temperature=0.7,
                                  micro_batch=micro_batch, mesh=mesh, response_len=response_len)
  placed = {k: rollout_batch.place(v, mesh) for k, v in batch.items()}
  state, m = update(state, placed)
  return jax.device_get(state.params), jax.device_get(m)


@pytest.mark.parametrize("aggregation,scan,response_len", [
    ("token_mean", False, None), ("token_mean", True, 10), ("seq_mean_token_mean", True, None)])
def test_micro_batches_equal_the_formula(aggregation, scan, response_len):
  """Accumulating 4 micro-batches gives the gradient of combine_microbatches' step loss, computed
  here from full-sequence, layer-by-layer log-probs: the scanned blocks (remat on) and the
  response-only LM head (`response_len` = the batch's completion columns) change nothing."""
  cfg = grpo_obj.GRPOLossConfig(aggregation=aggregation)
  batch = make_batch()
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  model = sharding.create_model(CFG, mesh, seed=0)
  graphdef, params, rest = steps.split_model(model)
  update_graphdef = graphdef
  if scan:
    update_graphdef = steps.split_model(sharding.create_model(
        CFG.replace(scan_layers=True, remat="full"), mesh, seed=0))[0]

  def step_loss(p):
    sums, counts = [], []
    for i in range(4):
      sl = slice(i, None, 4)  # micro-batch i = rows i, i + 4 (strided, see steps._split_micro)
      mb = {k: jnp.asarray(v[sl]) for k, v in batch.items()}
      lp, ent = steps._target_logprobs(graphdef, rest, p, mb["tokens"], mb["mask"], 0.7, True)
      s, c, _ = grpo_obj.grpo_loss(lp, jax.lax.stop_gradient(lp), mb["ref_logp"], ent, mb["adv"],
                                   mb["loss_mask"][:, 1:], cfg)
      sums.append(s)
      counts.append(c)
    return grpo_obj.combine_microbatches(jnp.stack(sums), jnp.stack(counts), cfg)

  want_loss, want_grads = jax.value_and_grad(step_loss)(params)
  tx = optax.sgd(1.0)  # new params = params - grads: compares the gradient itself
  state = steps.init_state(params, tx)
  update = steps.make_grpo_update(update_graphdef, rest, tx, cfg, temperature=0.7, micro_batch=2,
                                  response_len=response_len)
  before = jax.device_get(params)
  state, m = update(state, {k: rollout_batch.place(v, mesh) for k, v in batch.items()})
  got_grads = jax.tree.map(lambda a, b: a - b, before, jax.device_get(state.params))
  np.testing.assert_allclose(float(m["loss"]), float(want_loss), rtol=1e-5, atol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(jax.device_get(want_grads))):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("scan", [True])  # the default; unrolled blocks on the (2, 2, 2) mesh:
# tests/train/test_multihost.py and tests/models/test_sharding.py
def test_eight_devices_equal_one_device(scan):
  batch = make_batch(seed=1)
  cfg = CFG.replace(scan_layers=scan, remat="full" if scan else "none")
  one = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  eight = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  p1, m1 = run_update(one, batch, micro_batch=4, cfg=cfg, response_len=10 if scan else None)
  p8, m8 = run_update(eight, batch, micro_batch=4, cfg=cfg, response_len=10 if scan else None)
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # f32 reduction order only


def test_nonfinite_loss_skips_the_update():
  batch = make_batch(seed=2)
  batch["ref_logp"] = np.full_like(batch["ref_logp"], np.nan)
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  model = sharding.create_model(CFG, mesh, seed=0)
  graphdef, params, rest = steps.split_model(model)
  before = jax.device_get(params)
  tx = optax.adamw(1e-2)
  state = steps.init_state(params, tx)
  update = steps.make_grpo_update(graphdef, rest, tx, grpo_obj.GRPOLossConfig(),
                                  temperature=0.7, micro_batch=8)
  state, m = update(state, {k: rollout_batch.place(v, mesh) for k, v in batch.items()})
  assert not bool(m["finite"])
  assert int(state.step) == 0
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)


def test_kl_coef_zero_needs_no_reference():
  """With kl_coef 0 the batch may omit ref_logp (GRPO then skips the reference pass): the update
  equals one given any reference log-probs, whose KL term then weighs nothing."""
  one = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  no_kl = grpo_obj.GRPOLossConfig(kl_coef=0.0)
  batch = make_batch(seed=4)
  with_ref, m_ref = run_update(one, batch, micro_batch=4, loss_cfg=no_kl)
  batch.pop("ref_logp")
  without, m = run_update(one, batch, micro_batch=4, loss_cfg=no_kl)
  assert float(m["kl"]) == 0.0 and float(m_ref["kl"]) != 0.0  # the metric still reports it
  for a, b in zip(jax.tree.leaves(without), jax.tree.leaves(with_ref)):
    np.testing.assert_array_equal(a, b)
