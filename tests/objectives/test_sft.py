"""SFT batch building and loss (method.md 3.3-3.4) against torch cross-entropy (float64 reference;
JAX in float32: rtol 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cqr_jax.objectives import sft_loss, sft_targets, token_logprobs

EOS, PAD = 9, 0


def test_targets_layout():
  b = sft_targets([[1, 2, 3], [4]], [[5, 6], [7, 8, 5]], eos_id=EOS, max_len=8, pad_id=PAD)
  np.testing.assert_array_equal(b.input_ids, [[1, 2, 3, 5, 6, 9, 0, 0], [4, 7, 8, 5, 9, 0, 0, 0]])
  np.testing.assert_array_equal(b.target_ids, [[2, 3, 5, 6, 9, 0, 0, 0], [7, 8, 5, 9, 0, 0, 0, 0]])
  # Targets 5, 6 and EOS of example 0 (prompt targets 2, 3 masked); 7, 8, 5, EOS of example 1.
  np.testing.assert_array_equal(b.loss_mask, [[0, 0, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b.attention_mask,
                                [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(b.positions[1], np.arange(8))


def test_truncation():
  with pytest.raises(ValueError, match=r"example 1 has 6 tokens .* max_len = 5"):
    sft_targets([[1], [1, 2, 3]], [[2], [4, 5]], eos_id=EOS, max_len=5)
  b = sft_targets([[1], [1, 2, 3]], [[2], [4, 5]], eos_id=EOS, max_len=5, truncation="right")
  np.testing.assert_array_equal(b.input_ids[1], [1, 2, 3, 4, 5])  # EOS cut
  np.testing.assert_array_equal(b.loss_mask[1], [0, 0, 1, 1, 0])
  with pytest.raises(ValueError, match="2 prompts but 1 responses"):
    sft_targets([[1], [2]], [[3]], eos_id=EOS, max_len=5)


def test_loss_matches_torch_cross_entropy():
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(1, 30, size=k)) for k in (3, 7, 2, 5)]
  responses = [list(rng.integers(1, 30, size=k)) for k in (4, 1, 6, 0)]
  b = sft_targets(prompts, responses, eos_id=31, max_len=12)
  logits = rng.normal(size=(4, 12, 32))

  def mean_loss(lg):
    s, c = sft_loss(token_logprobs(lg, jnp.asarray(b.target_ids)), jnp.asarray(b.loss_mask))
    return s / c

  loss, g = jax.value_and_grad(mean_loss)(jnp.asarray(logits, jnp.float32))
  tl = torch.tensor(logits, requires_grad=True)
  m = torch.tensor(b.loss_mask, dtype=torch.bool)
  ref = torch.nn.functional.cross_entropy(tl[m], torch.tensor(b.target_ids, dtype=torch.long)[m])
  ref.backward()
  assert int(b.loss_mask.sum()) == (4 + 1) + (1 + 1) + (6 + 1) + (0 + 1)  # response + EOS
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g), tl.grad.numpy(), rtol=1e-5, atol=1e-7)
