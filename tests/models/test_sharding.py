"""Sharded model on 8 fake CPU devices (tests/conftest.py) equals the 1-device model."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cqr_jax.models import attention
from cqr_jax.models.config import ModelConfig
from cqr_jax.models.tiny_hf import padded_batch
from cqr_jax.sharding import (MeshConfig, batch_sharding, create_model,
                              make_mesh, param_specs, shard_batch)

SHARD_TOL = 1e-5  # issue 2: sharded logits equal 1-device logits within 1e-5 (f32)

CFG = ModelConfig(family="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True,
                  tie_word_embeddings=False)

# Expected specs per mesh: params replicated over "data"; D over "fsdp"; heads/mlp/vocab "tensor".
EXPECTED = {
    (8, 1, 1): {"embed.embedding": P(None, None),
                "layers.0.attn.q_proj.kernel": P(None, None),
                "layers.0.mlp.down_proj.kernel": P(None, None)},
    (1, 8, 1): {"embed.embedding": P(None, "fsdp"),
                "lm_head.embedding": P(None, "fsdp"),
                "layers.0.attn.q_proj.kernel": P("fsdp", None),
                "layers.1.attn.o_proj.kernel": P(None, "fsdp"),
                "layers.0.mlp.down_proj.kernel": P(None, "fsdp"),
                "layers.0.attn.k_proj.bias": P(None),
                "final_norm.scale": P(None)},
    (2, 2, 2): {"embed.embedding": P("tensor", "fsdp"),
                "lm_head.embedding": P("tensor", "fsdp"),
                "layers.0.attn.q_proj.kernel": P("fsdp", "tensor"),
                "layers.0.attn.k_proj.kernel": P("fsdp", "tensor"),
                "layers.0.attn.q_proj.bias": P("tensor"),
                "layers.0.attn.o_proj.kernel": P("tensor", "fsdp"),
                "layers.1.mlp.gate_proj.kernel": P("fsdp", "tensor"),
                "layers.1.mlp.down_proj.kernel": P("tensor", "fsdp"),
                "layers.1.attn_norm.scale": P(None)},
}


@pytest.fixture(scope="module")
def reference():
  assert len(jax.devices()) == 8, "tests/conftest.py should provide 8 fake CPU devices"
  model = create_model(CFG, make_mesh(MeshConfig(), jax.devices()[:1]), seed=5)
  rng = np.random.default_rng(5)
  batch = padded_batch(rng, CFG.vocab_size, 8, 12, "left")
  targets = rng.integers(0, CFG.vocab_size, batch[0].shape).astype(np.int32)
  logits, logp = _forward(nnx.graphdef(model))(nnx.state(model), *batch, targets)
  return batch, targets, np.asarray(logits), np.asarray(logp)


def _forward(graphdef):
  @jax.jit
  def f(state, tokens, positions, mask, targets):
    m = nnx.merge(graphdef, state)
    return (m(tokens, positions, mask),
            m.token_logprobs(tokens, positions, mask, targets, chunk_size=5))
  return f


@pytest.mark.parametrize("shape", sorted(EXPECTED))
def test_sharded_equals_single_device(reference, shape):
  (tokens, positions, mask), targets, ref_logits, ref_logp = reference
  mesh = make_mesh(MeshConfig(*shape))
  assert dict(mesh.shape) == dict(zip(("data", "fsdp", "tensor"), shape))
  model = create_model(CFG, mesh, seed=5)
  specs = param_specs(model)
  for name, spec in EXPECTED[shape].items():
    assert specs[name] == spec, (shape, name, specs[name])
  # every parameter lives on all 8 devices, and each device holds only its shard
  q = model.layers[0].attn.q_proj.kernel[...]
  assert len(q.sharding.device_set) == 8
  n_shards = int(np.prod([mesh.shape[a] for a in ("fsdp", "tensor")]))
  assert q.addressable_shards[0].data.size == q.size // n_shards

  graphdef, state = nnx.split(model)
  batch = shard_batch((tokens, positions, mask, targets), mesh)
  assert batch[0].sharding.spec == P(("data", "fsdp"), None)
  with jax.set_mesh(mesh):
    logits, logp = _forward(graphdef)(state, *batch)
  assert np.abs(np.asarray(logits) - ref_logits)[mask > 0].max() < SHARD_TOL
  assert np.abs(np.asarray(logp) - ref_logp).max() < SHARD_TOL


def test_sharded_prefill_keeps_rows_sharded_and_matches_forward(reference):
  """A prefill (the one forward keeping its keys, as the sampler's) on a 2 x 2 x 2 mesh: the
  kept keys keep their rows on (data, fsdp) and the logits equal the one-device forward's."""
  (tokens, positions, mask), _, ref_logits, _ = reference
  mesh = make_mesh(MeshConfig(2, 2, 2))
  model = create_model(CFG, mesh, seed=5)
  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill(state, toks, pos, mask):
    model = nnx.merge(graphdef, state)
    h, kv = model.forward(toks, pos, attention.causal_rows(mask, keep_kv=True))
    return model.logits(h), kv

  with jax.set_mesh(mesh):
    logits, kv = prefill(state, *shard_batch((tokens, positions, mask), mesh))
  keys = kv[0][0] if isinstance(kv, list) else kv[0]
  rows_axis = 0 if isinstance(kv, list) else 1
  assert keys.sharding.spec[rows_axis] == ("data", "fsdp")
  assert np.abs(np.asarray(logits) - ref_logits)[mask > 0].max() < SHARD_TOL


def test_mesh_config_errors():
  assert MeshConfig(2, -1, 2).shape(8) == (2, 2, 2)
  with pytest.raises(ValueError, match="at most one axis"):
    MeshConfig(-1, -1, 1).shape(8)
  with pytest.raises(ValueError, match="not divisible"):
    MeshConfig(3, -1, 1).shape(8)
  with pytest.raises(ValueError, match="number of devices"):
    MeshConfig(2, 2, 1).shape(8)
