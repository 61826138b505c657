"""Token selection ops against the exact softmax: distribution (chi-square), kept sets, greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cqr_jax import sampling_ops as ops

LOGITS_V = np.array([2.0, 1.6, 1.1, 0.5, 0.0, -0.4, -1.0, -2.0], np.float32)
N = 40_000


def _draw(temperature, top_k=0, top_p=None, seed=0):
  logits_nv = jnp.broadcast_to(jnp.asarray(LOGITS_V), (N, LOGITS_V.size))
  fn = jax.jit(lambda k, x, t, p: ops.select_tokens(k, x, t, top_k=top_k, top_p=p))
  toks, logps = fn(jax.random.key(seed), logits_nv, temperature, top_p)
  return np.asarray(toks), np.asarray(logps)


def _probs(temperature, keep=None):
  z = LOGITS_V.astype(np.float64) / temperature
  p = np.exp(z - z.max())
  if keep is not None:
    p = np.where(keep, p, 0.0)
  return p / p.sum()


def _chi2_pvalue(tokens, p):
  counts = np.bincount(tokens, minlength=p.size)
  support = p > 0
  assert counts[~support].sum() == 0, f"emitted tokens outside the kept set: {counts}"
  return stats.chisquare(counts[support], p[support] * len(tokens)).pvalue


def test_temperature_distribution_matches_softmax_and_detects_wrong_t():
  toks, _ = _draw(0.7)
  assert _chi2_pvalue(toks, _probs(0.7)) > 1e-4
  # Power: the same samples clearly reject a temperature off by 0.05 and T = 1.
  assert _chi2_pvalue(toks, _probs(0.75)) < 1e-6
  assert _chi2_pvalue(toks, _probs(1.0)) < 1e-6


def test_top_p_keeps_the_crossing_token_exactly():
  p = _probs(0.7)
  cum = np.cumsum(p)  # LOGITS_V is sorted descending
  # top_p just above cum[1] -> tokens 0, 1, 2 kept (2 crosses the threshold); an off-by-one
  # keeps 2 or 4 tokens and fails the set equality or the chi-square.
  top_p = float(cum[1] + 1e-3)
  toks, _ = _draw(0.7, top_p=top_p)
  keep = np.arange(8) < 3
  assert set(np.unique(toks)) == {0, 1, 2}
  assert _chi2_pvalue(toks, _probs(0.7, keep)) > 1e-4
  # top_p exactly at a cumulative mass keeps only that prefix.
  toks, _ = _draw(0.7, top_p=float(cum[2]) - 1e-6)
  assert set(np.unique(toks)) == {0, 1, 2}


def test_top_k_and_combined():
  toks, _ = _draw(0.7, top_k=3)
  assert _chi2_pvalue(toks, _probs(0.7, np.arange(8) < 3)) > 1e-4
  assert set(np.unique(toks)) == {0, 1, 2}
  # top-p applies to the top-k-renormalised distribution (HF / vLLM order).
  pk = _probs(0.7, np.arange(8) < 4)
  toks, _ = _draw(0.7, top_k=4, top_p=float(pk[0] + 1e-3))
  assert set(np.unique(toks)) == {0, 1}


def test_logprobs_are_full_tempered_distribution():
  toks, logps = _draw(0.7, top_k=3)
  np.testing.assert_allclose(logps, np.log(_probs(0.7))[toks], rtol=1e-5, atol=1e-6)


def test_greedy_is_argmax_first_on_ties_with_t1_logprobs():
  x = jnp.array([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 0.0, 0.0]])
  toks, logps = ops.select_tokens(jax.random.key(0), x, temperature=0.0)
  assert toks.tolist() == [1, 0]
  np.testing.assert_allclose(logps, jax.nn.log_softmax(x)[jnp.arange(2), toks], atol=1e-6)


def test_traced_zero_temperature_is_greedy():
  toks, logps = _draw(0.0)
  assert (toks == 0).all()
  np.testing.assert_allclose(logps, np.log(_probs(1.0))[0], rtol=1e-5)


def test_inverse_cdf_across_blocks_and_zero_weights():
  # V not a multiple of the block; mass in several blocks; zero weights in between and at ends.
  v = 3 * ops.BLOCK + 17
  rng = np.random.default_rng(0)
  w = np.zeros(v)
  idx = np.array([1, 5, ops.BLOCK - 1, ops.BLOCK, 2 * ops.BLOCK + 3, v - 2])
  w[idx] = rng.uniform(0.2, 1.0, size=idx.size)
  w_nv = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (N, v))
  toks = np.asarray(jax.jit(ops.inverse_cdf_sample)(jax.random.key(3), w_nv))
  assert _chi2_pvalue(toks, w / w.sum()) > 1e-4
  # A single positive weight, even a tiny one next to zeros, is always the pick.
  one = jnp.zeros((4, v)).at[:, v - 1].set(1e-30)
  assert (ops.inverse_cdf_sample(jax.random.key(0), one) == v - 1).all()


def test_filter_never_drops_the_argmax():
  x = jax.random.normal(jax.random.key(1), (64, 100)) * 5
  out = ops.filter_logits(x, top_k=1, top_p=1e-6)
  kept = np.isfinite(np.asarray(out))
  assert (kept.sum(-1) == 1).all()
  assert (np.argmax(kept, -1) == np.asarray(jnp.argmax(x, -1))).all()


@pytest.mark.parametrize("kw,msg", [
    (dict(temperature=-0.1, top_k=0, top_p=1.0), "temperature"),
    (dict(temperature=float("nan"), top_k=0, top_p=1.0), "temperature"),
    (dict(temperature=0.7, top_k=-1, top_p=1.0), "top_k"),
    (dict(temperature=0.7, top_k=0, top_p=0.0), "top_p"),
    (dict(temperature=0.7, top_k=0, top_p=1.5), "top_p"),
])
def test_bad_sampling_args(kw, msg):
  with pytest.raises(ValueError, match=msg):
    ops.check_sampling_args(**kw)
