"""Tempered log-probs and entropy (method.md 4.5) against torch (float64; JAX f32: rtol 1e-5)."""

import jax.numpy as jnp
import numpy as np
import torch

from cqr_jax.objectives import logprobs_and_entropy, token_logprobs


def test_tempered_logprobs_and_entropy_match_torch():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, size=(3, 5, 50))
  tgt = rng.integers(0, 50, size=(3, 5))
  lp, ent = logprobs_and_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(tgt), 0.7)
  z = torch.tensor(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)),
                   dtype=torch.float64) / 0.7
  logq = torch.log_softmax(z, -1)
  ref_lp = torch.gather(logq, -1, torch.tensor(tgt)[..., None])[..., 0]
  ref_ent = -(logq.exp() * logq).sum(-1)
  np.testing.assert_allclose(np.asarray(lp), ref_lp.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent), ref_ent.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(token_logprobs(jnp.asarray(logits, jnp.bfloat16),
                                                       jnp.asarray(tgt), 0.7)),
                             np.asarray(lp), rtol=1e-6)
