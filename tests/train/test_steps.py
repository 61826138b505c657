"""The jitted GRPO/SFT updates: exact micro-batch accumulation over grouped (prefix-shared) batches,
and 8 devices == 1 device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cqr_jax import sharding
from cqr_jax.models.config import ModelConfig
from cqr_jax.objectives import grpo as grpo_obj
from cqr_jax.testing import random_rollouts, rollout_rows
from train import rollout_batch, steps

CFG = ModelConfig(family="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=1)


def with_common_head(roll, head_len: int, seed: int):
  """The rollouts with the same `head_len` random tokens before every prompt (re-left-padded)."""
  head = np.random.default_rng(seed).integers(2, CFG.vocab_size, head_len).astype(np.int32)
  width = roll.prompt_ids.shape[1] + head_len
  ids = np.zeros((len(roll.prompt_ids), width), np.int32)
  mask = np.zeros((len(roll.prompt_ids), width), bool)
  for i, (row, m) in enumerate(zip(roll.prompt_ids, roll.prompt_mask)):
    real = np.concatenate([head, row[m]])
    ids[i, width - len(real):], mask[i, width - len(real):] = real, True
  return dataclasses.replace(roll, prompt_ids=ids, prompt_mask=mask)


def make_batch(seed=0, prompts=4, n=2, mesh=None, micro_batch=2, pack=False, shared=0):
  """(rollouts, flat rows, grouped batch): the grouped batch is rollout_batch.assemble's (with
  `pack`, the completions also packed; with `shared`, every prompt starts with the same
  `shared` + 3 tokens, of which the first `shared` run once), with per-rollout reference
  log-probs [G, m, Lc] and advantages [G, m]."""
  roll = random_rollouts(seed, CFG.vocab_size, prompts, n)
  if shared:
    roll = with_common_head(roll, shared + 3, seed + 200)
  rng = np.random.default_rng(seed + 100)
  rows = len(roll.finish_reasons)
  ref = rng.normal(-3.0, 0.5, roll.completion_ids.shape).astype(np.float32)
  adv = rng.normal(size=rows).astype(np.float32)
  batch = rollout_batch.assemble(roll, mesh, micro_batch, pack=pack, shared_prefix_min=shared)
  if shared:  # the prompts keep the bucket's width less the prefix (one width a bucket)
    assert batch["prefix"].shape == (shared,)
    assert batch["prompt"].shape[1] == roll.prompt_ids.shape[1] - shared
  g, m, lc = batch["completion"].shape
  batch["ref_logp"] = rollout_batch.place(ref.reshape(g, m, lc), mesh)
  batch["adv"] = rollout_batch.place(adv.reshape(g, m), mesh)
  flat = rollout_rows(roll)
  flat["ref_logp"] = np.pad(ref, ((0, 0), (roll.prompt_ids.shape[1] - 1, 0)))
  flat["adv"] = adv
  return roll, flat, batch


def run_update(mesh, micro_batch, loss_cfg=grpo_obj.GRPOLossConfig(), cfg=CFG, seed=1,
               drop=(), pack=False, shared=0):
  model = sharding.create_model(cfg, mesh, seed=0)
  graphdef, params, rest = steps.split_model(model)
  tx = optax.sgd(1.0)  # params - grads: compares the gradients (Adam's first step is ~sign(g))
  state = steps.init_state(params, tx)
  update = steps.make_grpo_update(graphdef, rest, tx, loss_cfg, temperature=0.7,
                                  micro_batch=micro_batch, mesh=mesh)
  _, _, batch = make_batch(seed, mesh=mesh, micro_batch=micro_batch, pack=pack, shared=shared)
  state, m = update(state, {k: v for k, v in batch.items() if k not in drop})
  return jax.device_get(state.params), jax.device_get(m), batch["completion"].shape


def test_group_size():
  assert rollout_batch.group_size(8, 8) == 8
  assert rollout_batch.group_size(8, 4) == 4
  assert rollout_batch.group_size(4, 8, data_parallel=2) == 4
  assert rollout_batch.group_size(4, 4, data_parallel=4) == 1   # one completion per device
  assert rollout_batch.group_size(6, 4) == 2


@pytest.mark.parametrize("aggregation,scan,pack,shared,block", [
    ("token_mean", False, False, 0, 0), ("token_mean", True, False, 0, 3),
    ("seq_mean_token_mean", True, False, 0, 8), ("token_mean", False, True, 0, 4),
    ("seq_mean_token_mean", True, True, 0, 8), ("token_mean", False, True, 16, 3),
    ("seq_mean_token_mean", True, True, 16, 8)])
def test_micro_batches_equal_the_formula(aggregation, scan, pack, shared, block, monkeypatch):
  """The grouped update (each prompt's forward shared by its samples, 4 micro-batches of one
  group) gives the gradient of combine_microbatches' step loss computed here from flat rows
  prompt ++ completion, layer by layer: prefix sharing, packed completions, the step's common
  prompt prefix run once (its keys' gradient summed over the micro-batches, then through its
  forward), the scanned blocks (remat on) and the response-only LM head change nothing. The
  token mean runs over each micro-batch (block 0) or over blocks of 3 or 4 consecutive rollouts
  that straddle micro-batches and groups (the last block of 3 is short)."""
  cfg = grpo_obj.GRPOLossConfig(aggregation=aggregation, token_mean_seqs=block)
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  monkeypatch.setattr(rollout_batch, "PACK_ROW_MULTIPLE", 1)  # row counts as the data gives
  roll, flat, batch = make_batch(mesh=mesh, micro_batch=2, pack=pack, shared=shared)
  if pack:  # micro-batches packed in different row counts
    assert len({p["packed"].shape[1] for p in batch["packs"]}) == 2
  assert batch["completion"].shape[:2] == (4, 2)  # groups of both samples of a prompt
  model = sharding.create_model(CFG, mesh, seed=0)
  graphdef, params, rest = steps.split_model(model)
  update_graphdef = graphdef
  if scan:
    update_graphdef = steps.split_model(sharding.create_model(
        CFG.replace(scan_layers=True, remat="full"), mesh, seed=0))[0]

  # Each part's own (loss_sum, count), combined as the table says: with blocks, a token mean
  # per block of consecutive rollouts; else micro-batch i = group i (strided split).
  flat_cfg = dataclasses.replace(cfg, token_mean_seqs=0)
  rollouts = len(roll.prompt_index)
  parts = ([np.arange(b, min(b + block, rollouts)) for b in range(0, rollouts, block)]
           if cfg.blocks else [np.flatnonzero(roll.prompt_index == i) for i in range(4)])

  def step_loss(p):
    sums, counts = [], []
    for rows in parts:
      mb = {k: jnp.asarray(v[rows]) for k, v in flat.items()}
      lp, ent = steps._target_logprobs(graphdef, rest, p, mb["tokens"], mb["mask"], 0.7, True)
      s, c, _ = grpo_obj.grpo_loss(lp, jax.lax.stop_gradient(lp), mb["ref_logp"], ent, mb["adv"],
                                   mb["loss_mask"][:, 1:], flat_cfg)
      sums.append(s)
      counts.append(c)
    return grpo_obj.combine_microbatches(jnp.stack(sums), jnp.stack(counts), flat_cfg)

  want_loss, want_grads = jax.jit(jax.value_and_grad(step_loss))(params)
  tx = optax.sgd(1.0)  # new params = params - grads: compares the gradient itself
  state = steps.init_state(params, tx)
  update = steps.make_grpo_update(update_graphdef, rest, tx, cfg, temperature=0.7, micro_batch=2)
  before = jax.device_get(params)
  state, m = update(state, batch)
  got_grads = jax.tree.map(lambda a, b: a - b, before, jax.device_get(state.params))
  np.testing.assert_allclose(float(m["loss"]), float(want_loss), rtol=1e-5, atol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(jax.device_get(want_grads))):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("pack,shared", [(False, 0), (True, 0), (True, 16)])
def test_reference_pass_equals_flat_rows(pack, shared):
  """make_logprob_fn on the grouped batch (padded or packed completions, the common prompt
  prefix run once or not) = the model's log-probs of each completion token on the flat row
  prompt ++ completion (f32)."""
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  roll, flat, batch = make_batch(seed=5, mesh=mesh, micro_batch=4, pack=pack, shared=shared)
  model = sharding.create_model(CFG, mesh, seed=0)
  graphdef, params, rest = steps.split_model(model)
  got = steps.make_logprob_fn(graphdef, rest, temperature=0.7, micro_batch=4)(params, batch)
  want = steps._target_logprobs(graphdef, rest, params, flat["tokens"], flat["mask"], 0.7, False)
  want = np.asarray(want)[:, roll.prompt_ids.shape[1] - 1:]
  got = np.asarray(got).reshape(want.shape)
  np.testing.assert_allclose(np.where(roll.completion_mask, got, 0),
                             np.where(roll.completion_mask, want, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aggregation,pack,shared", [
    ("token_sum_global", False, 0), ("token_sum_global", True, 16), ("token_mean", False, 0),
    ("token_mean", True, 16)])
def test_eight_devices_equal_one_device(aggregation, pack, shared):
  """On the (2, 2, 2) mesh, micro-batches of 4 completions spread one per data-parallel device
  (groups of 1: no prefix sharing); on one device the 2 samples of a prompt share its forward.
  Same update either way, with the completions padded (one scan) or packed (a call per
  micro-batch) and the prompts' common prefix run once a step: a global token mean, or the
  paper's token mean over blocks of a prompt's n samples (token_mean_seqs = n, as verl's
  8-sequence micro-batches with n = 8), whose blocks the 8-device micro-batches split (rollouts
  0, 2, 4, 6 together) where one device keeps them whole (rollouts 0, 1, 4, 5)."""
  cfg = CFG.replace(scan_layers=True, remat="full")
  loss_cfg = grpo_obj.GRPOLossConfig(aggregation=aggregation, token_mean_seqs=2)
  one = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  eight = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  kw = {"micro_batch": 4, "cfg": cfg, "loss_cfg": loss_cfg, "pack": pack, "shared": shared}
  p1, m1, shape1 = run_update(one, **kw)
  p8, m8, shape8 = run_update(eight, **kw)
  assert shape1[:2] == (4, 2) and shape8[:2] == (8, 1)
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # f32 reduction order only


def test_nonfinite_loss_skips_the_update():
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  _, _, batch = make_batch(seed=2, mesh=mesh, micro_batch=8)
  batch["ref_logp"] = jnp.full(batch["ref_logp"].shape, jnp.nan)
  model = sharding.create_model(CFG, mesh, seed=0)
  graphdef, params, rest = steps.split_model(model)
  before = jax.device_get(params)
  tx = optax.adamw(1e-2)
  state = steps.init_state(params, tx)
  update = steps.make_grpo_update(graphdef, rest, tx, grpo_obj.GRPOLossConfig(),
                                  temperature=0.7, micro_batch=8)
  state, m = update(state, batch)
  assert not bool(m["finite"])
  assert int(state.step) == 0
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)


def test_kl_coef_zero_needs_no_reference():
  """With kl_coef 0 the batch may omit ref_logp (GRPO then skips the reference pass): the update
  equals one given any reference log-probs, whose KL term then weighs nothing."""
  one = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  no_kl = grpo_obj.GRPOLossConfig(kl_coef=0.0)
  with_ref, m_ref, _ = run_update(one, micro_batch=4, loss_cfg=no_kl, seed=4)
  without, m, _ = run_update(one, micro_batch=4, loss_cfg=no_kl, seed=4, drop=("ref_logp",))
  assert float(m["kl"]) == 0.0 and float(m_ref["kl"]) != 0.0  # the metric still reports it
  for a, b in zip(jax.tree.leaves(without), jax.tree.leaves(with_ref)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scan", [False, True])
def test_packed_logprobs_equal_padded_rows(scan):
  """Decoder.packed_completion_logprobs over pack_groups' streams = completion_logprobs over the
  left-padded prompt and padded completion rows (log-probs and entropies, f32), with prompts
  spanning several rows (so later rows see the first rows' prompt keys), completions crossing
  row ends, and a last row partly empty."""
  from cqr_jax.models.decoder import Decoder
  from flax import nnx
  cfg = CFG.replace(scan_layers=scan)
  model = Decoder(cfg, rngs=nnx.Rngs(7))
  rng = np.random.default_rng(7)
  g, m, lc, lp = 2, 3, 6, 16
  prompt = rng.integers(2, 97, (g, lp)).astype(np.int32)
  prompt_mask = np.arange(lp)[None] >= np.array([[0], [5]])  # 16 and 11 real tokens
  lengths = np.array([[6, 2, 5], [1, 6, 3]])
  mask = np.arange(lc)[None, None] < lengths[..., None]
  comp = np.where(mask, rng.integers(2, 97, (g, m, lc)), 0).astype(np.int32)
  pack = rollout_batch.pack_groups(prompt, prompt_mask, comp, mask)
  # 16 + 13 tokens -> 5 rows of 6, rounded up to 8 (PACK_ROW_MULTIPLE), capped at the unpacked
  # layout's ceil((16 + 3 * 6) / 6) = 6: the last row is empty
  assert pack["packed"].shape == (g, 6, lc)
  want = model.completion_logprobs(prompt, prompt_mask, comp.reshape(g * m, lc),
                                   mask.reshape(g * m, lc), m, temperature=0.7, with_entropy=True)
  got = model.packed_completion_logprobs(
      *(pack[k] for k in ("packed", "packed_segment", "packed_position", "packed_source",
                          "packed_unpack")), prompt_width=lp, temperature=0.7,
      with_entropy=True)
  live = mask.reshape(g * m, lc)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a)[live], np.asarray(b)[live], rtol=1e-5, atol=1e-5)


def test_pack_groups_layout():
  """Each group's prompt (real tokens) then its completions end to end: unpack gives back every
  completion token, segments name its completion (m for the prompt, -1 empty), positions
  continue from the prompt's length, a token's source is the slot before it (the prompt's last
  for a completion's first token), k = ceil(longest group / Lc) rounded up to a multiple of
  PACK_ROW_MULTIPLE, at most the unpacked layout's rows."""
  rng = np.random.default_rng(0)
  lengths = np.array([[3, 5, 4], [1, 2, 1]])
  comp = rng.integers(2, 50, (2, 3, 5)).astype(np.int32)
  mask = np.arange(5)[None, None] < lengths[..., None]
  prompt = rng.integers(2, 50, (2, 4)).astype(np.int32)
  prompt_mask = np.array([[False, True, True, True], [False, False, False, True]])
  out = rollout_batch.pack_groups(prompt, prompt_mask, np.where(mask, comp, 0), mask)
  # 3 + 12 tokens in the first group -> 3 rows of 5 -> 4 (PACK_ROW_MULTIPLE; the cap is
  # ceil((4 + 3 * 5) / 5) = 4)
  assert rollout_batch.PACK_ROW_MULTIPLE == 4 and out["packed"].shape == (2, 4, 5)
  # a longer completion budget: still 4 rows (a multiple of 4), not 3
  wide = rollout_batch.pack_groups(prompt, prompt_mask, np.pad(np.where(mask, comp, 0),
                                                               ((0, 0), (0, 0), (0, 5))),
                                   np.pad(mask, ((0, 0), (0, 0), (0, 5))))
  assert wide["packed"].shape == (2, 4, 10)
  flat = {k: v.reshape(2, -1) for k, v in out.items() if k != "packed_unpack"}
  plen = prompt_mask.sum(-1)
  for i in range(2):
    np.testing.assert_array_equal(flat["packed"][i, :plen[i]], prompt[i, prompt_mask[i]])
    np.testing.assert_array_equal(flat["packed_segment"][i, :plen[i]], 3)
    np.testing.assert_array_equal(flat["packed_position"][i, :plen[i]], np.arange(plen[i]))
    for j in range(3):
      slots = out["packed_unpack"][i, j, :lengths[i, j]]
      np.testing.assert_array_equal(flat["packed"][i, slots], comp[i, j, :lengths[i, j]])
      np.testing.assert_array_equal(flat["packed_segment"][i, slots], j)
      np.testing.assert_array_equal(flat["packed_position"][i, slots],
                                    plen[i] + np.arange(lengths[i, j]))
      np.testing.assert_array_equal(flat["packed_source"][i, slots],
                                    np.concatenate([[plen[i] - 1], slots[:-1]]))
  assert (flat["packed_segment"][0, :15] >= 0).all() and (flat["packed_segment"][0, 15:] == -1).all()
  assert (flat["packed_segment"][1, 1 + 4:] == -1).all()
  with pytest.raises(ValueError, match="prefix of ones"):
    rollout_batch.pack_groups(prompt, prompt_mask, comp, mask[:, :, ::-1])
  with pytest.raises(ValueError, match="real prompt token"):
    rollout_batch.pack_groups(prompt, prompt_mask & False, comp, mask)


@pytest.mark.parametrize("pack", [False, True])
def test_all_equal_groups_leave_parameters_unchanged(pack):
  """n = 8, every group's rewards equal (values whose float32 mean is inexact), KL and entropy
  off: the advantages are exactly 0, so one AdamW step changes no parameter (weight decay 0,
  the only term that moves a parameter without a gradient)."""
  from cqr_jax import schedules
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=jax.devices()[:1])
  model = sharding.create_model(CFG, mesh, seed=0)
  graphdef, params, rest = steps.split_model(model)
  tx = schedules.grpo_optimizer(lr=1e-3, warmup_steps=0, weight_decay=0.0)
  state = steps.init_state(params, tx)
  before = jax.device_get(state.params)
  loss_cfg = grpo_obj.GRPOLossConfig(kl_coef=0.0, entropy_coef=0.0)
  update = steps.make_grpo_update(graphdef, rest, tx, loss_cfg, temperature=0.7,
                                  micro_batch=8, mesh=mesh)
  _, _, batch = make_batch(0, prompts=3, n=8, mesh=mesh, micro_batch=8, pack=pack)
  rewards = np.repeat(np.float32([16 / 9, 89 / 90, -0.1]), 8)
  adv = np.asarray(grpo_obj.group_advantages(rewards, 8))
  g, m, _ = batch["completion"].shape
  batch["adv"] = rollout_batch.place(adv.reshape(g, m), mesh)
  state, _ = update(state, {k: v for k, v in batch.items() if k != "ref_logp"})
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
