"""Token log-probs and entropies from logits at a sampling temperature (method.md 4.5).

Logits are divided by the rollout temperature before the log-softmax, for the old, reference and
current policy alike; the entropy is that of the same tempered distribution. Computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def logprobs_and_entropy(logits_btv: jax.Array, targets_bt: jax.Array, temperature: float = 1.0):
  """Returns (logp_bt, entropy_bt): log π(targets) and H(π) under softmax(logits / temperature)."""
  z_btv = logits_btv.astype(jnp.float32) / temperature
  lse_bt = jax.nn.logsumexp(z_btv, axis=-1)
  z_tgt_bt = jnp.take_along_axis(z_btv, targets_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]
  p_btv = jnp.exp(z_btv - lse_bt[..., None])
  entropy_bt = lse_bt - jnp.sum(p_btv * z_btv, axis=-1)
  return z_tgt_bt - lse_bt, entropy_bt


def token_logprobs(logits_btv: jax.Array, targets_bt: jax.Array, temperature: float = 1.0):
  """log π(targets) under softmax(logits / temperature), [B, T]."""
  z_btv = logits_btv.astype(jnp.float32) / temperature
  lse_bt = jax.nn.logsumexp(z_btv, axis=-1)
  z_tgt_bt = jnp.take_along_axis(z_btv, targets_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return z_tgt_bt - lse_bt
