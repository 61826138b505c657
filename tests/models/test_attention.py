"""Attention against a plain reference: the entry point `attend` and the context layout (a
prompt's keys met by all its completions' queries at once, `context_rows`) equal softmax(q k^T) v
written out per query head over concatenated, repeated keys, in value and gradient (f32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cqr_jax.models.attention import attend as attend_hm
from cqr_jax.models.attention import context_rows, heads_major

TOL = dict(rtol=1e-5, atol=1e-5)


def reference(q_btnd, k_bskd, v_bskd, mask_bts):
  """Per query head h (kv head h // G), float64 numpy. A query with no visible key has no
  defined output (compare only queries that see some key)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_btnd, k_bskd, v_bskd))
  b, t, h, dh = q.shape
  g = h // k.shape[2]
  out = np.zeros((b, t, h, dh))
  for hi in range(h):
    s = np.einsum("btd,bsd->bts", q[:, :, hi], k[:, :, hi // g]) / np.sqrt(dh)
    s = np.where(mask_bts, s, -np.inf)
    s = s - np.max(np.where(mask_bts, s, -1e300), axis=-1, keepdims=True)
    p = np.where(mask_bts, np.exp(s), 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    out[:, :, hi] = np.einsum("bts,bsd->btd", p, v[:, :, hi // g])
  return out.reshape(b, t, h * dh)


def attend(q_btnd, k_bskd, v_bskd, mask_bts, compute_dtype):
  """The attention entry point with keys/values in the [B, S, KVH, Dh] layout."""
  return attend_hm(q_btnd, heads_major(k_bskd), heads_major(v_bskd), mask_bts, compute_dtype)


def random_qkv(key, b, t, s, h, kvh, dh=8):
  kq, kk, kv = jax.random.split(key, 3)
  return (jax.random.normal(kq, (b, t, h, dh)), jax.random.normal(kk, (b, s, kvh, dh)),
          jax.random.normal(kv, (b, s, kvh, dh)))


@pytest.mark.parametrize("h,kvh", [(4, 2), (3, 3), (6, 1)])
def test_attend_equals_reference(h, kvh):
  q, k, v = random_qkv(jax.random.key(0), 3, 7, 7, h, kvh)
  valid_bs = np.ones((3, 7), bool)
  valid_bs[1, :3] = False  # left padding
  mask_bts = np.tril(np.ones((7, 7), bool))[None] & valid_bs[:, None, :]
  got = np.asarray(attend(q, k, v, jnp.asarray(mask_bts), jnp.float32))
  live = mask_bts.any(-1)  # queries that see some key
  np.testing.assert_allclose(got[live], reference(q, k, v, mask_bts)[live], **TOL)
  assert np.isfinite(got).all()  # fully masked rows stay finite


def plain(q_btnd, k_bskd, v_bskd, mask_bts):
  """softmax(q k^T / sqrt(Dh)) v per query head with jax.nn.softmax, differentiated by jax
  (the reference for attention's own backward rule)."""
  b, t, h, dh = q_btnd.shape
  g = h // k_bskd.shape[2]
  k, v = jnp.repeat(k_bskd, g, axis=2), jnp.repeat(v_bskd, g, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q_btnd, k) / np.sqrt(dh)
  p = jax.nn.softmax(jnp.where(mask_bts[:, None], s, -1e30), axis=-1)
  return jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, h * dh)


@pytest.mark.parametrize("h,kvh", [(4, 2), (6, 1)])
def test_attend_gradient_equals_autodiff(h, kvh):
  """attend's backward rule (dS = P * (dP - rowsum(dO * O))) gives jax's gradient of the plain
  masked softmax, with left padding, a fully masked query row and a sparse (packed) mask."""
  q, k, v = random_qkv(jax.random.key(3), 2, 6, 9, h, kvh)
  rng = np.random.default_rng(3)
  mask_bts = rng.random((2, 6, 9)) < 0.6
  mask_bts[0, 2] = False  # a query that sees nothing
  w = jax.random.normal(jax.random.key(4), (2, 6, h * 8))
  grads = [jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
           for f in (lambda q, k, v: attend(q, k, v, jnp.asarray(mask_bts), jnp.float32),
                     lambda q, k, v: plain(q, k, v, jnp.asarray(mask_bts)))]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, **TOL)


def concatenated(qc, kp, vp, kc, vc, prompt_mask, own_mask, n):
  """The same attention over keys prompt ++ own, the prompt repeated for each of its n rows."""
  k = jnp.concatenate([jnp.repeat(kp, n, axis=0), kc], axis=1)
  v = jnp.concatenate([jnp.repeat(vp, n, axis=0), vc], axis=1)
  lc = qc.shape[1]
  seen = jnp.broadcast_to(jnp.repeat(prompt_mask, n, axis=0)[:, None], (qc.shape[0], lc,
                                                                        kp.shape[1]))
  return attend(qc, k, v, jnp.concatenate([seen, own_mask], axis=-1), jnp.float32)


@pytest.mark.parametrize("p,n,h,kvh", [(2, 3, 4, 2), (1, 4, 6, 3), (3, 1, 2, 1)])
def test_context_rows_equal_repeated_prompt_keys(p, n, h, kvh):
  lp, lc, dh = 6, 5, 8
  keys = jax.random.split(jax.random.key(1), 3)
  _, kp, vp = random_qkv(keys[0], p, 1, lp, h, kvh, dh)
  qc, kc, vc = random_qkv(keys[1], p * n, lc, lc, h, kvh, dh)
  rng = np.random.default_rng(0)
  prompt_mask = np.arange(lp)[None] >= rng.integers(0, lp - 1, p)[:, None]  # left-padded
  comp_mask = np.arange(lc)[None] < rng.integers(1, lc + 1, p * n)[:, None]  # right-padded
  own_mask = np.tril(np.ones((lc, lc), bool))[None] & comp_mask[:, None, :]
  pm, om = jnp.asarray(prompt_mask), jnp.asarray(own_mask)

  def shared(qc, kp, vp, kc, vc):
    layout = context_rows(pm, om, n)
    return layout(qc, kc, vc, (heads_major(kp), heads_major(vp)), jnp.float32)[0]

  def flat(qc, kp, vp, kc, vc):
    return concatenated(qc, kp, vp, kc, vc, pm, om, n)

  args = (qc, kp, vp, kc, vc)
  np.testing.assert_allclose(shared(*args), flat(*args), **TOL)
  w = jax.random.normal(keys[2], (p * n, lc, h * dh)) * comp_mask[..., None]  # real rows only
  grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=tuple(range(5)))(*args)
           for f in (shared, flat)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, **TOL)
