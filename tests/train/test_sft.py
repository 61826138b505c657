"""SFT's common prefix: which tokens may run once (`cqr_jax.shared_prefix.for_examples`), and the update with them
run once equals the update over whole rows."""

import jax
import numpy as np
import optax
import pytest

from cqr_jax import sharding
from tests.train.test_steps import CFG
from train import rollout_batch, steps
from cqr_jax.shared_prefix import for_examples as shared_prefix_len


def examples_with_head(head_len: int, seed: int = 0, n: int = 4):
  """n (ids, loss mask) examples: the same `head_len` tokens, then 5-12 prompt tokens of their
  own, then a 3-7 token response (the loss)."""
  rng = np.random.default_rng(seed)
  head = rng.integers(2, CFG.vocab_size, head_len).tolist()
  out = []
  for _ in range(n):
    own, resp = int(rng.integers(5, 13)), int(rng.integers(3, 8))
    ids = head + rng.integers(2, CFG.vocab_size, own + resp).tolist()
    out.append((ids, [0] * (head_len + own) + [1] * resp))
  return out


def test_shared_prefix_len_rounds_down_and_stops_before_the_first_target_input():
  assert shared_prefix_len(examples_with_head(37), 16) == 32
  assert shared_prefix_len(examples_with_head(37), 33) == 0  # under the minimum
  assert shared_prefix_len(examples_with_head(37), 0) == 0   # off
  assert shared_prefix_len(examples_with_head(37)[:1], 16) == 0
  # The same prompt four times (different responses): the prefix ends before the input of the
  # first response token, at 16 x floor((prompt length - 1) / 16).
  prompt = list(range(2, 35))  # 33 tokens
  same = [(prompt + [40 + i, 41], [0] * 33 + [1, 1]) for i in range(4)]
  assert shared_prefix_len(same, 16) == 32
  same = [(prompt[:32] + [40 + i, 41], [0] * 32 + [1, 1]) for i in range(4)]
  assert shared_prefix_len(same, 16) == 16


def sft_batch(examples, shared: int, mesh):
  """train/sft.py's batch: rows left-padded after the first `shared` tokens, "prefix" those."""
  width = rollout_batch.bucket_length(max(len(i) for i, _ in examples), 16) - shared
  rows = {"tokens": rollout_batch.pad_left([i[shared:] for i, _ in examples], width, 0),
          "mask": rollout_batch.pad_left([[1] * (len(i) - shared) for i, _ in examples], width,
                                         0).astype(bool),
          "loss_mask": rollout_batch.pad_left([m[shared:] for _, m in examples], width,
                                              0).astype(bool)}
  batch = {k: rollout_batch.place(v, mesh) for k, v in rows.items()}
  if shared:
    batch["prefix"] = rollout_batch.place_replicated(np.asarray(examples[0][0][:shared],
                                                                np.int32), mesh)
  return batch


@pytest.mark.parametrize("scan", [False, True])
def test_update_with_the_prefix_run_once_equals_whole_rows(scan):
  """Loss and gradient (sgd(1): params - grads) of 2 micro-batches with the examples' 32-token
  common prefix run once per micro-batch equal those of the whole rows; with scanned blocks
  under full remat too, and the response-only LM head."""
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  cfg = CFG.replace(scan_layers=True, remat="full") if scan else CFG
  examples = examples_with_head(37, seed=3)
  shared = shared_prefix_len(examples, 16)
  assert shared == 32
  response_len = max(sum(m) for _, m in examples)
  out = []
  for s in (0, shared):
    graphdef, params, rest = steps.split_model(sharding.create_model(cfg, mesh, seed=0))
    state = steps.init_state(params, optax.sgd(1.0))
    update = steps.make_sft_update(graphdef, rest, optax.sgd(1.0), micro_batch=2, mesh=mesh,
                                   response_len=response_len)
    before = jax.device_get(params)
    state, m = update(state, sft_batch(examples, s, mesh))
    grads = jax.tree.map(lambda a, b: a - b, before, jax.device_get(state.params))
    out.append((jax.device_get(m), grads))
  (m_full, g_full), (m_pre, g_pre) = out
  assert float(m_pre["tokens"]) == float(m_full["tokens"]) == sum(sum(m) for _, m in examples)
  np.testing.assert_allclose(float(m_pre["loss"]), float(m_full["loss"]), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g_pre), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
