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


def make_batch(seed=0, prompts=4, n=2, mesh=None, micro_batch=2, shared=0, pack_rows=0):
  """(rollouts, flat rows, GRPO batch): the batch is rollout_batch.grpo_batch's (streams of
  `pack_rows` rows; with `shared`, every prompt starts with the same `shared` + 3 tokens, of
  which the first `shared` run once), with reference log-probs per slot and advantages [R]."""
  roll = random_rollouts(seed, CFG.vocab_size, prompts, n)
  if shared:
    roll = with_common_head(roll, shared + 3, seed + 200)
  rng = np.random.default_rng(seed + 100)
  rows = len(roll.finish_reasons)
  ref = rng.normal(-3.0, 0.5, roll.completion_ids.shape).astype(np.float32)
  adv = rng.normal(size=rows).astype(np.float32)
  batch = rollout_batch.grpo_batch(roll, mesh, micro_batch, pack_rows=pack_rows,
                                   shared_prefix_min=shared)
  if shared:  # the prompts keep the bucket's width less the prefix (one width a bucket)
    assert batch.prefix.shape == (shared,)
    assert batch.prompt_width == roll.prompt_ids.shape[1] - shared
  batch = dataclasses.replace(batch, ref_logp=batch.per_slot(jnp.asarray(ref)),
                              adv=rollout_batch.place_replicated(adv, mesh))
  flat = rollout_rows(roll)
  flat["ref_logp"] = np.pad(ref, ((0, 0), (roll.prompt_ids.shape[1] - 1, 0)))
  flat["adv"] = adv
  return roll, flat, batch


def streams_per_group(batch) -> np.ndarray:
  """[streams] holding at least one completion, by group (rollout // m)."""
  idx = np.asarray(batch.rollout).reshape(-1, batch.unpack.shape[-2])
  m = idx.shape[-1]
  real = idx[(idx >= 0).any(-1)]
  return np.bincount(real.max(-1) // m)


def run_update(mesh, micro_batch, loss_cfg=grpo_obj.GRPOLossConfig(), cfg=CFG, seed=1,
               drop=(), shared=0, pack_rows=0):
  model = sharding.create_model(cfg, mesh, seed=0)
  graphdef, params, rest = steps.split_model(model)
  tx = optax.sgd(1.0)  # params - grads: compares the gradients (Adam's first step is ~sign(g))
  state = steps.init_state(params, tx)
  update = steps.make_grpo_update(graphdef, rest, tx, loss_cfg, temperature=0.7,
                                  micro_batch=micro_batch, mesh=mesh)
  _, _, batch = make_batch(seed, mesh=mesh, micro_batch=micro_batch, shared=shared,
                           pack_rows=pack_rows)
  state, m = update(state, dataclasses.replace(batch, **{k: None for k in drop}))
  return jax.device_get(state.params), jax.device_get(m), batch.unpack.shape[-2]


def test_group_size():
  assert rollout_batch.group_size(8, 8) == 8
  assert rollout_batch.group_size(8, 4) == 4
  assert rollout_batch.group_size(4, 8, data_parallel=2) == 4
  assert rollout_batch.group_size(4, 4, data_parallel=4) == 1   # one completion per device
  assert rollout_batch.group_size(6, 4) == 2


SPILL = 1  # grpo.pack_rows: streams of 2 rows of 10 (a prompt and one completion always fit)


@pytest.mark.parametrize("aggregation,scan,shared,block,pack_rows", [
    ("token_mean", False, 0, 0, 0), ("token_mean", True, 0, 3, 0),
    ("seq_mean_token_mean", True, 0, 8, 0), ("token_mean", False, 0, 4, SPILL),
    ("seq_mean_token_mean", True, 0, 8, SPILL), ("token_mean", False, 16, 3, SPILL),
    ("seq_mean_token_mean", True, 16, 8, 0), ("token_mean", True, 16, 0, SPILL)])
def test_micro_batches_equal_the_formula(aggregation, scan, shared, block, pack_rows):
  """The packed update (each prompt's forward shared by the completions of its stream, calls of
  one stream) gives the gradient of combine_microbatches' step loss computed here from flat rows
  prompt ++ completion, layer by layer: prefix sharing, packed completions, continuation
  streams (pack_rows SPILL: a group's completions spread over two streams), the step's common
  prompt prefix run once (its keys' gradient summed over the calls, then through its forward),
  the scanned blocks (remat on) and the response-only LM head change nothing. The token mean
  runs over each micro-batch (block 0: a call's completions, a whole group when nothing
  spills) or over blocks of 3 or 4 consecutive rollouts that straddle calls and groups (the
  last block of 3 is short)."""
  cfg = grpo_obj.GRPOLossConfig(aggregation=aggregation, token_mean_seqs=block)
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  seed = 2 if pack_rows == SPILL else 0  # seed 2's groups spill, in both prompt layouts
  roll, flat, batch = make_batch(seed, mesh=mesh, micro_batch=2, shared=shared,
                                 pack_rows=pack_rows)
  assert batch.unpack.shape[-2] == 2  # groups of both samples of a prompt
  spread = streams_per_group(batch)
  assert (spread.max() > 1) == (pack_rows == SPILL), spread
  model = sharding.create_model(CFG, mesh, seed=0)
  graphdef, params, rest = steps.split_model(model)
  update_graphdef = graphdef
  if scan:
    update_graphdef = steps.split_model(sharding.create_model(
        CFG.replace(scan_layers=True, remat="full"), mesh, seed=0))[0]

  # Each part's own (loss_sum, count), combined as the table says: with blocks, a token mean
  # per block of consecutive rollouts; else per micro-batch (call i's rollouts).
  flat_cfg = dataclasses.replace(cfg, token_mean_seqs=0)
  rollouts = len(roll.prompt_index)
  idx = np.asarray(batch.rollout).reshape(batch.num_calls, -1)
  parts = ([np.arange(b, min(b + block, rollouts)) for b in range(0, rollouts, block)]
           if cfg.blocks else [np.sort(r[r >= 0]) for r in idx])

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


@pytest.mark.parametrize("shared,pack_rows", [(0, 0), (16, 0), (0, SPILL)])
def test_reference_pass_equals_flat_rows(shared, pack_rows):
  """make_logprob_fn on the GRPO batch (completions packed, in one stream a group or spilled
  into continuation streams, the common prompt prefix run once or not) = the model's log-probs
  of each completion token on the flat row prompt ++ completion (f32)."""
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  roll, flat, batch = make_batch(seed=5, mesh=mesh, micro_batch=4, shared=shared,
                                 pack_rows=pack_rows)
  model = sharding.create_model(CFG, mesh, seed=0)
  graphdef, params, rest = steps.split_model(model)
  got = steps.make_logprob_fn(graphdef, rest, temperature=0.7, micro_batch=4)(params, batch)
  want = steps._target_logprobs(graphdef, rest, params, flat["tokens"], flat["mask"], 0.7, False)
  want = np.asarray(want)[:, roll.prompt_ids.shape[1] - 1:]
  got = rollout_batch.per_rollout(batch, got, len(want))
  np.testing.assert_allclose(np.where(roll.completion_mask, got, 0),
                             np.where(roll.completion_mask, want, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aggregation,shared,pack_rows", [
    ("token_sum_global", 0, 0), ("token_sum_global", 16, SPILL), ("token_mean", 0, SPILL),
    ("token_mean", 16, 0)])
def test_eight_devices_equal_one_device(aggregation, shared, pack_rows):
  """On the (2, 2, 2) mesh, calls of 4 streams spread one per data-parallel device (groups of
  1: no prefix sharing); on one device the 2 samples of a prompt share its forward (or, with
  pack_rows SPILL, may spill into continuation streams). Same update either way, the prompts'
  common prefix run once a step or not: a global token mean, or the paper's token mean over
  blocks of a prompt's n samples (token_mean_seqs = n, as verl's 8-sequence micro-batches with
  n = 8), whose blocks the 8-device calls split (rollouts 0, 2, 4, 6 together) where one device
  keeps them whole."""
  cfg = CFG.replace(scan_layers=True, remat="full")
  loss_cfg = grpo_obj.GRPOLossConfig(aggregation=aggregation, token_mean_seqs=2)
  one = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  eight = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  kw = {"micro_batch": 4, "cfg": cfg, "loss_cfg": loss_cfg, "shared": shared,
        "pack_rows": pack_rows, "seed": 2 if pack_rows == SPILL else 1}
  p1, m1, group1 = run_update(one, **kw)
  p8, m8, group8 = run_update(eight, **kw)
  assert group1 == 2 and group8 == 1
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # f32 reduction order only


def test_spilled_groups_equal_whole_groups():
  """The default loss (token mean over blocks of sequences) and its gradient do not depend on
  the stream budget: groups spilled into continuation streams (pack_rows SPILL, more calls)
  give the update of one stream a group (pack_rows 0), and the same reference log-probs."""
  one = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  loss_cfg = grpo_obj.GRPOLossConfig(token_mean_seqs=2)
  whole, m_whole, _ = run_update(one, micro_batch=2, loss_cfg=loss_cfg, seed=3, pack_rows=0)
  spilled, m_spill, _ = run_update(one, micro_batch=2, loss_cfg=loss_cfg, seed=3,
                                   pack_rows=SPILL)
  _, _, b0 = make_batch(3, mesh=one, micro_batch=2, pack_rows=0)
  _, _, b1 = make_batch(3, mesh=one, micro_batch=2, pack_rows=SPILL)
  assert b1.num_calls > b0.num_calls and streams_per_group(b1).max() == 2
  np.testing.assert_allclose(m_spill["loss"], m_whole["loss"], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(spilled), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  graphdef, params, rest = steps.split_model(sharding.create_model(CFG, one, seed=0))
  ref = steps.make_logprob_fn(graphdef, rest, temperature=0.7, micro_batch=2)
  rows = len(np.asarray(b0.lengths))
  mask = np.asarray(b0.rollout_mask())
  got0 = rollout_batch.per_rollout(b0, ref(params, b0), rows)
  got1 = rollout_batch.per_rollout(b1, ref(params, b1), rows)
  np.testing.assert_allclose(np.where(mask, got1, 0), np.where(mask, got0, 0), rtol=1e-5,
                             atol=1e-5)


def test_update_compiles_once_for_any_completion_lengths():
  """Steps whose completions differ in length (and so in how many calls their streams need)
  run one compiled update call and one compiled reference call: the row count is static."""
  one = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  graphdef, params, rest = steps.split_model(sharding.create_model(CFG, one, seed=0))
  tx = optax.sgd(0.1)
  state = steps.init_state(params, tx)
  update = steps.make_grpo_update(graphdef, rest, tx, grpo_obj.GRPOLossConfig(),
                                  temperature=0.7, micro_batch=2, mesh=one)
  ref = steps.make_logprob_fn(graphdef, rest, temperature=0.7, micro_batch=2, mesh=one)
  calls, lengths = set(), set()
  for seed in (11, 12, 13):
    _, _, batch = make_batch(seed, mesh=one, micro_batch=2, pack_rows=SPILL)
    batch = dataclasses.replace(batch, ref_logp=ref(state.params, batch))
    state, m = update(state, batch)
    assert bool(m["finite"])
    calls.add(batch.num_calls)
    lengths.add(tuple(np.asarray(batch.lengths)))
  assert len(lengths) == 3 and len(calls) > 1, calls
  assert update.compiles() == {"micro": 1}
  assert ref.one._cache_size() == 1


def test_nonfinite_loss_skips_the_update():
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  _, _, batch = make_batch(seed=2, mesh=mesh, micro_batch=8)
  batch = dataclasses.replace(batch, ref_logp=jnp.full(batch.ref_logp.shape, jnp.nan))
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


@pytest.mark.parametrize("scan,rows", [(False, 6), (True, 6), (False, 4)])
def test_packed_logprobs_equal_padded_rows(scan, rows):
  """Decoder.packed_completion_logprobs over pack_streams' streams = token_logprobs over flat rows
  of a prompt's real tokens then one completion (log-probs and entropies, f32), with prompts
  spanning several rows (so later rows see the first rows' prompt keys), completions crossing
  row ends, a last row partly empty, and (4 rows) a group spilled into a continuation stream."""
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
  pack = rollout_batch.pack_streams(prompt, prompt_mask, comp, mask, rows)
  # 16 + 13 tokens fit 6 rows of 6 (the last empty); 4 rows hold 16 + 6 + 2, then 16 + 5 again
  assert pack["tokens"].shape == ({6: 2, 4: 3}[rows], rows, lc)
  # Flat reference: each completion's row holds its prompt's real tokens then the completion
  # (right-padded); the log-prob of completion token t is read where it is the target.
  rows_ = [np.concatenate([prompt[i // m][prompt_mask[i // m]], comp[i // m, i % m]])
           for i in range(g * m)]
  flat = np.zeros((g * m, lp + lc), np.int32)
  for i, r in enumerate(rows_):
    flat[i, :len(r)] = r
  flat_mask = np.zeros_like(flat)
  plen = prompt_mask.sum(1).repeat(m)
  for i in range(g * m):
    flat_mask[i, :plen[i] + lengths.reshape(-1)[i]] = 1
  pos = np.maximum(np.cumsum(flat_mask, 1) - 1, 0).astype(np.int32)
  lp_f, ent_f = model.token_logprobs(flat[:, :-1], pos[:, :-1], flat_mask[:, :-1], flat[:, 1:],
                                     temperature=0.7, with_entropy=True)
  at = plen[:, None] - 1 + np.arange(lc)[None]  # where completion token t is the target
  want = [np.take_along_axis(np.asarray(x), np.minimum(at, lp + lc - 2), 1) for x in (lp_f, ent_f)]
  got = model.packed_completion_logprobs(
      *(pack[k] for k in ("tokens", "segment", "position", "source", "unpack")),
      prompt_width=lp, temperature=0.7, with_entropy=True)
  idx = pack["rollout"].reshape(-1)
  live = mask.reshape(g * m, lc)
  for a, b in zip(got, want):
    a = np.asarray(a)[idx >= 0][np.argsort(idx[idx >= 0])]
    np.testing.assert_allclose(a[live], np.asarray(b)[live], rtol=1e-5, atol=1e-5)


def test_pack_streams_layout():
  """Each group's prompt (real tokens) then its completions end to end: unpack gives back every
  completion token, segments name its slot (m for the prompt, -1 empty), positions continue
  from the prompt's length, a token's source is the slot before it (the prompt's last for a
  completion's first token); a completion that does not fit goes to the first of its group's
  streams with room, else to a continuation stream that repeats the prompt; `rollout` names
  the completion in each slot. stream_rows: the budget, at least a prompt and one completion,
  at most a prompt and all m."""
  rng = np.random.default_rng(0)
  lengths = np.array([[3, 5, 4], [1, 2, 1]])
  comp = rng.integers(2, 50, (2, 3, 5)).astype(np.int32)
  mask = np.arange(5)[None, None] < lengths[..., None]
  prompt = rng.integers(2, 50, (2, 4)).astype(np.int32)
  prompt_mask = np.array([[False, True, True, True], [False, False, False, True]])
  comp = np.where(mask, comp, 0)
  assert [rollout_batch.stream_rows(4, 3, 5, r) for r in (0, 1, 2, 9)] == [4, 2, 2, 4]
  # 2 rows of 5: group 0 = 3 + 3 + 4 (completions 0 and 2), then 3 + 5 (1); group 1 whole
  out = rollout_batch.pack_streams(prompt, prompt_mask, comp, mask, 2)
  np.testing.assert_array_equal(out["rollout"], [[0, 2, -1], [1, -1, -1], [3, 4, 5]])
  group = [0, 0, 1]
  flat = {k: v.reshape(3, -1) for k, v in out.items() if k in ("tokens", "segment", "position",
                                                                "source")}
  plen = prompt_mask.sum(-1)
  for s in range(3):
    i = group[s]
    np.testing.assert_array_equal(flat["tokens"][s, :plen[i]], prompt[i, prompt_mask[i]])
    np.testing.assert_array_equal(flat["segment"][s, :plen[i]], 3)
    np.testing.assert_array_equal(flat["position"][s, :plen[i]], np.arange(plen[i]))
    used = plen[i]
    for q, r in enumerate(out["rollout"][s]):
      if r < 0:
        continue
      j = r % 3
      slots = out["unpack"][s, q, :lengths[i, j]]
      np.testing.assert_array_equal(slots, used + np.arange(lengths[i, j]))
      np.testing.assert_array_equal(flat["tokens"][s, slots], comp[i, j, :lengths[i, j]])
      np.testing.assert_array_equal(flat["segment"][s, slots], q)
      np.testing.assert_array_equal(flat["position"][s, slots], plen[i] + np.arange(lengths[i, j]))
      np.testing.assert_array_equal(flat["source"][s, slots],
                                    np.concatenate([[plen[i] - 1], slots[:-1]]))
      used += lengths[i, j]
    assert (flat["segment"][s, used:] == -1).all()
  with pytest.raises(ValueError, match="prefix of ones"):
    rollout_batch.pack_streams(prompt, prompt_mask, comp, mask[:, :, ::-1], 2)
  with pytest.raises(ValueError, match="real prompt token"):
    rollout_batch.pack_streams(prompt, prompt_mask & False, comp, mask, 2)
  with pytest.raises(ValueError, match="do not fit"):
    rollout_batch.pack_streams(prompt, prompt_mask, comp, mask, 1)


def test_all_equal_groups_leave_parameters_unchanged():
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
  _, _, batch = make_batch(0, prompts=3, n=8, mesh=mesh, micro_batch=8, pack_rows=SPILL)
  rewards = np.repeat(np.float32([16 / 9, 89 / 90, -0.1]), 8)
  adv = np.asarray(grpo_obj.group_advantages(rewards, 8))
  batch = dataclasses.replace(batch, ref_logp=None,
                              adv=rollout_batch.place_replicated(adv, mesh))
  state, _ = update(state, batch)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
