"""Token selection for the rollout engine: temperature, top-k, top-p, greedy (method.md 4.4, 4.5).

All functions are jittable. `temperature` and `top_p` may be traced scalars (changing them does
not recompile); `top_k` and whether top-p is on at all (`top_p=None` = off) are static. The order
is HF `generate`'s and vLLM's: logits / T, then top-k, then top-p on the top-k-renormalised
distribution. Temperature 0 is greedy (argmax, first index on ties, as torch.argmax).

Returned log-probs are always those of the *full* tempered distribution, log softmax(logits / T),
at the chosen token: the quantity GRPO recomputes in training (method.md 4.5), which ignores the
top-k / top-p truncation. Greedy reports log softmax(logits) (T = 1).

Sampling draws one uniform per row and inverts the CDF in two levels (blocks of `BLOCK` tokens,
then tokens inside the chosen block): one pass of exp over the vocabulary, no [B, V] of random
bits (Gumbel-max over a 49k vocabulary costs ~10x the rest of the step on XLA:CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 256


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
  """Raises ValueError naming the offending argument."""
  if not temperature >= 0.0:  # also rejects NaN
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


def kept_mask(z_bv: jax.Array, *, top_k: int = 0, top_p=None) -> jax.Array | None:
  """[B, V] bool: the tokens top-k / top-p keep from tempered logits z (None if both are off).

  top-k keeps the k largest; top-p keeps the smallest prefix of tokens sorted by probability
  whose mass reaches top_p (the token crossing the threshold is kept, so the argmax always is).
  Ties at a boundary value are all kept.
  """
  vocab = z_bv.shape[-1]
  use_k = 0 < top_k < vocab
  if not use_k and top_p is None:
    return None
  k = top_k if use_k else vocab
  sorted_bk = jax.lax.top_k(z_bv, k)[0]  # descending
  if top_p is None:
    thresh_b1 = sorted_bk[:, -1:]
  else:
    probs_bk = jax.nn.softmax(sorted_bk, axis=-1)
    mass_before_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk
    keep_bk = (mass_before_bk < top_p).at[:, 0].set(True)
    thresh_b1 = jnp.min(jnp.where(keep_bk, sorted_bk, jnp.inf), axis=-1, keepdims=True)
  return z_bv >= thresh_b1


def filter_logits(logits_bv: jax.Array, *, top_k: int = 0, top_p=None) -> jax.Array:
  """Logits (f32) with the tokens outside the kept set at -inf."""
  x_bv = logits_bv.astype(jnp.float32)
  keep_bv = kept_mask(x_bv, top_k=top_k, top_p=top_p)
  return x_bv if keep_bv is None else jnp.where(keep_bv, x_bv, -jnp.inf)


def _last_true(m_bn: jax.Array) -> jax.Array:
  n = m_bn.shape[-1]
  return n - 1 - jnp.argmax(m_bn[:, ::-1], axis=-1)


def inverse_cdf_sample(key: jax.Array, w_bv: jax.Array, uniform_b: jax.Array | None = None
                       ) -> jax.Array:
  """One index per row with probability w / sum(w) (w >= 0, some w > 0 per row): [B] int32.

  uniform_b: the rows' draws in [0, 1) (default `jax.random.uniform(key, (B,))`); a caller that
  drops finished rows passes the draws of the rows it keeps, so each row's stream stays the same.
  Never returns an index whose weight is 0 (float rounding in the cumulative sums included).
  """
  b, v = w_bv.shape
  nblk = -(-v // BLOCK)
  w_bnk = jnp.pad(w_bv, ((0, 0), (0, nblk * BLOCK - v))).reshape(b, nblk, BLOCK)
  mass_bn = jnp.sum(w_bnk, axis=-1)
  cdf_bn = jnp.cumsum(mass_bn, axis=-1)
  pos_bn = mass_bn > 0
  total_b = jnp.max(jnp.where(pos_bn, cdf_bn, 0.0), axis=-1)
  if uniform_b is None:
    uniform_b = jax.random.uniform(key, (b,), jnp.float32)
  u_b = 1.0 - uniform_b  # (0, 1]: never picks a 0-weight head
  x_b = u_b * total_b
  hit_bn = (cdf_bn >= x_b[:, None]) & pos_bn
  blk_b = jnp.where(jnp.any(hit_bn, -1), jnp.argmax(hit_bn, -1), _last_true(pos_bn))
  blk_mass_b = jnp.take_along_axis(mass_bn, blk_b[:, None], -1)[:, 0]
  rem_b = x_b - (jnp.take_along_axis(cdf_bn, blk_b[:, None], -1)[:, 0] - blk_mass_b)
  w_bk = jnp.take_along_axis(w_bnk, blk_b[:, None, None], 1)[:, 0]
  inner_bk = jnp.cumsum(w_bk, axis=-1)
  pos_bk = w_bk > 0
  hit_bk = (inner_bk >= rem_b[:, None]) & pos_bk
  idx_b = jnp.where(jnp.any(hit_bk, -1), jnp.argmax(hit_bk, -1), _last_true(pos_bk))
  return (blk_b * BLOCK + idx_b).astype(jnp.int32)


def select_tokens(key: jax.Array, logits_bv: jax.Array, temperature, *, top_k: int = 0,
                  top_p=None, uniform_b: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Picks one token per row.

  Args:
    key: PRNG key (unused when temperature is the Python number 0).
    logits_bv: [B, V] raw model logits.
    temperature: Python float or traced scalar; 0 = greedy.
    top_k: static; 0 = off. top_p: float / traced scalar, or None = off.
    uniform_b: [B] draws in [0, 1) to sample with instead of drawing from `key`
      (`inverse_cdf_sample`).
  Returns:
    tokens_b [B] int32, logprobs_b [B] f32 = log softmax(logits / T)[token] (T = 1 if greedy).
  """
  x_bv = logits_bv.astype(jnp.float32)
  static_greedy = isinstance(temperature, (int, float)) and temperature == 0
  t = jnp.asarray(temperature, jnp.float32)
  z_bv = x_bv / jnp.where(t > 0, t, 1.0)
  m_b1 = jnp.max(z_bv, axis=-1, keepdims=True)
  e_bv = jnp.exp(z_bv - m_b1)
  lse_b = m_b1[:, 0] + jnp.log(jnp.sum(e_bv, axis=-1))
  greedy_b = jnp.argmax(x_bv, axis=-1).astype(jnp.int32)
  if static_greedy:
    tokens_b = greedy_b
  else:
    keep_bv = kept_mask(z_bv, top_k=top_k, top_p=top_p)
    w_bv = e_bv if keep_bv is None else jnp.where(keep_bv, e_bv, 0.0)
    tokens_b = jnp.where(t > 0, inverse_cdf_sample(key, w_bv, uniform_b), greedy_b)
  logprobs_b = jnp.take_along_axis(z_bv, tokens_b[:, None], axis=-1)[:, 0] - lse_b
  return tokens_b, logprobs_b
