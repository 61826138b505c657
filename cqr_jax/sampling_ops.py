"""Token selection for the rollout engine: temperature, top-k, top-p, greedy (method.md 4.4, 4.5).

All functions are pure and jittable; `temperature`, `top_k` and `top_p` are static Python numbers
(one compiled variant per sampling setting). The order is the one of HF `generate` and vLLM:
logits / T, then top-k, then top-p on the top-k-renormalised distribution.

Returned log-probs are always those of the *full* tempered distribution, log softmax(logits / T),
at the chosen token: the quantity GRPO recomputes in training (method.md 4.5), which ignores the
top-k / top-p truncation. Greedy (T = 0) reports log softmax(logits) (T = 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
  """Raises ValueError naming the offending argument."""
  if not temperature >= 0.0:  # also rejects NaN
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


def tempered_logprobs(logits_bv: jax.Array, temperature: float) -> jax.Array:
  """log softmax(logits / T) in f32; T = 0 (greedy) uses T = 1. [B, V] -> [B, V]."""
  t = 1.0 if temperature == 0.0 else float(temperature)
  return jax.nn.log_softmax(logits_bv.astype(jnp.float32) / t, axis=-1)


def _kth_largest(x_bv: jax.Array, k: int) -> jax.Array:
  """The k-th largest value per row: [B, V] -> [B, 1]."""
  return jax.lax.top_k(x_bv, k)[0][:, k - 1:k]


def filter_logits(logits_bv: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k / top-p kept set to -inf. [B, V] -> [B, V] (f32).

  top-k keeps the k largest logits; top-p keeps the smallest prefix of tokens sorted by
  probability whose mass reaches `top_p` (the token that crosses the threshold is kept, so the
  most likely token always is). Ties at a boundary value are all kept.
  """
  x_bv = logits_bv.astype(jnp.float32)
  vocab = x_bv.shape[-1]
  if top_k and top_k < vocab:
    x_bv = jnp.where(x_bv >= _kth_largest(x_bv, top_k), x_bv, NEG_INF)
  if top_p < 1.0:
    # Sorted (descending) candidates: only the top-k ones when top-k is on, else the whole vocab.
    k = top_k if top_k and top_k < vocab else vocab
    sorted_bk = jax.lax.top_k(x_bv, k)[0]
    probs_bk = jax.nn.softmax(sorted_bk, axis=-1)
    mass_before_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk
    keep_bk = mass_before_bk < top_p
    keep_bk = keep_bk.at[:, 0].set(True)
    # Smallest kept logit per row is the threshold.
    thresh_b1 = jnp.min(jnp.where(keep_bk, sorted_bk, jnp.inf), axis=-1, keepdims=True)
    x_bv = jnp.where(x_bv >= thresh_b1, x_bv, NEG_INF)
  return x_bv


def select_tokens(key: jax.Array, logits_bv: jax.Array, *, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Picks one token per row.

  Args:
    key: PRNG key (unused when temperature == 0).
    logits_bv: [B, V] raw model logits.
    temperature: 0 = greedy (argmax, first index on ties, as torch.argmax); else sample from
      softmax(filter(logits / T)).
  Returns:
    tokens_b [B] int32, logprobs_b [B] f32 = log softmax(logits / T)[token] (T = 1 if greedy).
  """
  logp_bv = tempered_logprobs(logits_bv, temperature)
  if temperature == 0.0:
    tokens_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  else:
    # Gumbel-max on the filtered tempered log-probs (softmax is shift invariant).
    cand_bv = filter_logits(logp_bv, top_k=top_k, top_p=top_p)
    tokens_b = jax.random.categorical(key, cand_bv, axis=-1).astype(jnp.int32)
  logprobs_b = jnp.take_along_axis(logp_bv, tokens_b[:, None], axis=-1)[:, 0]
  return tokens_b, logprobs_b
