"""Decoder numerics: logits parity with transformers (PyTorch, f32), KV cache, chunked log-probs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cqr_jax.models.config import ModelConfig
from cqr_jax.models.decoder import Decoder
from cqr_jax.models.hf_import import load_hf
from cqr_jax.models.tiny_hf import LLAMA3_SCALING, hf_logits, padded_batch, save_tiny_hf
from cqr_jax.sharding import abstract_model

PARITY_TOL = 1e-4  # issue 2: logits within 1e-4 of transformers f32

CASES = {
    # GQA 4/2, q/k/v biases, untied head
    "qwen2_gqa_bias_untied": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    # Llama-3.2 style: llama3 rope scaling (short original context so it matters), tied
    "llama3_rope_tied": ("llama", dict(tie_word_embeddings=True, rope_theta=500000.0,
                                       rope_scaling=dict(LLAMA3_SCALING))),
    # plain Llama / SmolLM2 style, multi-head (no grouping), untied
    "llama_mha_untied": ("llama", dict(num_key_value_heads=4, rope_theta=100000.0)),
}


@pytest.mark.parametrize("case,scan", [(c, False) for c in sorted(CASES)]
                         + [("qwen2_gqa_bias_untied", True)])
def test_logits_match_transformers(tmp_path, case, scan):
  family, kw = CASES[case]
  hf = save_tiny_hf(tmp_path, family, seed=1, **kw)
  model, cfg = load_hf(tmp_path, scan_layers=scan)
  assert cfg.family == family and cfg.tie_word_embeddings == kw.get("tie_word_embeddings", False)
  assert cfg.qkv_bias == (family == "qwen2")
  assert (cfg.rope_scaling is not None) == ("rope_scaling" in kw)
  fwd = nnx.jit(lambda m, t, p, k: m(t, p, k))
  rng = np.random.default_rng(0)
  for side in ("left", "right"):
    tokens, positions, mask = padded_batch(rng, cfg.vocab_size, 3, 20, side)
    ref = hf_logits(hf, tokens, positions, mask)
    out = np.asarray(fwd(model, tokens, positions, mask))
    assert out.dtype == np.float32 and out.shape == ref.shape
    err = np.abs(out - ref)[mask > 0].max()
    assert err < PARITY_TOL, (case, side, err)


def _tiny(**kw):
  base = dict(family="qwen2", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
              num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=False)
  base.update(kw)
  return ModelConfig(**base)


@pytest.mark.parametrize("side", ["left", "right"])
def test_kv_cache_prefill_then_decode_equals_full_forward(side):
  model = Decoder(_tiny(), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  b, p, n, s = 3, 7, 5, 16
  tokens, positions, mask = padded_batch(rng, 96, b, p + n, "left")
  if side == "right":  # right-padded prompts: decode continues at each row's own position
    tokens, positions, mask = padded_batch(rng, 96, b, p, "right")
    cont = rng.integers(0, 96, (b, n)).astype(np.int32)
    tokens = np.concatenate([tokens, cont], 1)
    positions = np.concatenate([positions, positions[:, -1:] + 1 + np.arange(n)], 1)
    mask = np.concatenate([mask, np.ones((b, n), np.int32)], 1)
  # full-forward reference: pad tokens in the prompt are masked as keys
  full = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, tokens, positions, mask))

  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, donate_argnums=(2,))
  def step(state, toks, cache, index, valid, pos):
    return nnx.merge(graphdef, state).decode(toks, pos, cache, index, valid)

  cache = model.init_cache(b, s)
  assert len(cache) == 2 and cache[0]["k"].shape == (b, s, 2, 8)
  valid = jnp.zeros((b, s), bool).at[:, :p].set(mask[:, :p] > 0)
  logits, cache = step(state, tokens[:, :p], cache, 0, valid, positions[:, :p])
  outs = [logits]
  for i in range(p, p + n):
    valid = valid.at[:, i].set(True)
    logits, cache = step(state, tokens[:, i:i + 1], cache, jnp.int32(i), valid,
                         positions[:, i:i + 1])
    outs.append(logits)
  dec = np.asarray(jnp.concatenate(outs, 1))
  assert np.abs(dec - full)[mask > 0].max() < 1e-5
  # last_only prefill: the same last-position logits and cache
  last, cache2 = nnx.merge(graphdef, state).decode(
      tokens[:, :p], positions[:, :p], model.init_cache(b, s), 0,
      jnp.zeros((b, s), bool).at[:, :p].set(mask[:, :p] > 0), last_only=True)
  assert last.shape == (b, 1, 96)
  np.testing.assert_allclose(last[:, 0], outs[0][:, -1], atol=1e-6)


def test_chunked_token_logprobs_equal_full_log_softmax():
  model = Decoder(_tiny(), rngs=nnx.Rngs(2))
  rng = np.random.default_rng(2)
  tokens, positions, mask = padded_batch(rng, 96, 2, 11, "left")
  targets = rng.integers(0, 96, tokens.shape).astype(np.int32)
  full = nnx.jit(lambda m, *a: m(*a))(model, tokens, positions, mask)

  @functools.partial(nnx.jit, static_argnums=(1, 2))
  def logprobs(m, temp, chunk):
    return m.token_logprobs(tokens, positions, mask, targets, temperature=temp, chunk_size=chunk,
                            with_entropy=True)

  for temp, chunk in ((1.0, 4), (0.7, 3), (1.3, 64)):
    logp, ent = logprobs(model, temp, chunk)
    ref = jax.nn.log_softmax(full / temp, axis=-1)
    ref_logp = jnp.take_along_axis(ref, targets[..., None], -1)[..., 0]
    ref_ent = -jnp.sum(jnp.exp(ref) * ref, -1)
    assert logp.shape == ent.shape == tokens.shape
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-5)
  only = model.token_logprobs(tokens, positions, mask, targets, chunk_size=5)
  assert only.shape == tokens.shape


def test_chunked_logprob_gradients_equal_full():
  """Gradients of log-probs and entropies through the chunked path, with each remat setting (which
  the LM-head chunks follow), equal the plain computation's."""
  graphdef, state = nnx.split(Decoder(_tiny(), rngs=nnx.Rngs(3)))
  rng = np.random.default_rng(3)
  tokens, positions, mask = padded_batch(rng, 96, 2, 9, "right")
  targets = rng.integers(0, 96, tokens.shape).astype(np.int32)

  def plain(state):
    m = nnx.merge(graphdef, state)
    lp = jax.nn.log_softmax(m(tokens, positions, mask), -1)
    ent = -jnp.sum(jnp.exp(lp) * lp, -1)
    return ((jnp.take_along_axis(lp, targets[..., None], -1)[..., 0] + 0.3 * ent) * mask).sum()

  ref = jax.jit(jax.grad(plain))(state)
  for remat in ("none", "full", "dots_saveable"):
    gd = nnx.graphdef(abstract_model(_tiny(remat=remat)))

    def chunked(state, gd=gd):
      m = nnx.merge(gd, state)
      lp, ent = m.token_logprobs(tokens, positions, mask, targets, chunk_size=4,
                                 with_entropy=True)
      return ((lp + 0.3 * ent) * mask).sum()

    grads = jax.jit(jax.grad(chunked))(state)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grads, ref))
    assert max(diffs) < 1e-5, remat


def test_bf16_compute_keeps_f32_logits_and_is_close():
  """compute_dtype=bfloat16: bf16 matmul operands, f32 accumulation; a different numeric setting,
  so only closeness (bf16 operand rounding, 2^-8 relative) is asserted, not parity."""
  model = Decoder(_tiny(), rngs=nnx.Rngs(4))
  rng = np.random.default_rng(4)
  tokens, positions, mask = padded_batch(rng, 96, 2, 8, "left")
  fwd = nnx.jit(lambda m, cdt: m(tokens, positions, mask, compute_dtype=cdt), static_argnums=1)
  f32, bf = fwd(model, "float32"), fwd(model, "bfloat16")
  assert bf.dtype == jnp.float32
  assert float(jnp.abs(bf - f32).max()) < 2e-2 * float(jnp.abs(f32).max())
