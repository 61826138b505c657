"""Grouped-query self-attention with RoPE and an optional functional KV cache.

Qwen2 adds biases to q/k/v (never to o); Llama has none. H query heads share KVH key/value heads
in groups of G = H / KVH. Scores and softmax are float32; masked scores are replaced (not added)
by a large negative number, so a row with no visible key stays finite.

The products run head-major: queries as [B, KVH, G * T, Dh] against keys/values [B, KVH, S, Dh],
so both are plain batched matmuls over (B, KVH) and their gradients need no transposes of the
[.., T, S] scores (bench/results/update.md). Training
attention runs one softmax over one key set per row (key sets such as a prompt's and a row's own
are concatenated, not combined part by part) with its own backward rule (`_softmax_attention`);
the sampler's decode step, which must not copy a shared prefix's keys per row, combines parts
(`joint_softmax`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from cqr_jax.models.config import ModelConfig
from cqr_jax.models.layers import Linear, mm
from cqr_jax.models.rope import apply_rope

NEG_INF = -1e30


def heads_major(x_btkd: jax.Array) -> jax.Array:
  """[B, T, K, Dh] -> [B, K, T, Dh]."""
  return x_btkd.transpose(0, 2, 1, 3)


def _group_queries(q_btnd, kvh: int):
  """Scaled queries [B, T, H, Dh] -> [B, KVH, G, T, Dh] (query head h uses kv head h // G)."""
  b, t, h, dh = q_btnd.shape
  return (q_btnd * (dh ** -0.5)).reshape(b, t, kvh, h // kvh, dh).transpose(0, 2, 3, 1, 4)


def joint_softmax(*scores):
  """softmax over the concatenation of the score arrays' last axes, returned as the parts
  (attention over several key sets, e.g. a shared prompt and a row's own tokens, without
  concatenating them)."""
  m = jax.lax.stop_gradient(functools.reduce(
      jnp.maximum, [jnp.max(s, -1, keepdims=True) for s in scores]))
  es = [jnp.exp(s - m) for s in scores]
  z = sum(jnp.sum(e, -1, keepdims=True) for e in es)
  return tuple(e / z for e in es)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _softmax_attention(q_bkqd, k_bksd, v_bksd, mask_bts, groups: int, compute_dtype):
  """softmax(q k^T, masked) v over head-major grouped queries q [B, KVH, G * T, Dh] (scaled),
  keys/values [B, KVH, S, Dh], mask_bts [B, T, S] shared by the G query heads of a kv head
  -> [B, KVH, G * T, Dh] float32.

  Its own backward (the softmax rule dS = P * (dP - rowsum(dO * O))): fewer passes over the
  [.., T, S] scores than differentiating the masked softmax op by op (the GRPO step benchmark,
  bench/results/grpo_step.md)."""
  return _softmax_attention_fwd(q_bkqd, k_bksd, v_bksd, mask_bts, groups, compute_dtype)[0]


def _masked(x_bkqs, mask_bts, groups, fill):
  b, kvh, q, s = x_bkqs.shape
  x = x_bkqs.reshape(b, kvh, groups, q // groups, s)
  return jnp.where(mask_bts[:, None, None], x, fill).reshape(b, kvh, q, s)


def _softmax_attention_fwd(q_bkqd, k_bksd, v_bksd, mask_bts, groups, compute_dtype):
  s_bkqs = _masked(mm(q_bkqd, k_bksd, compute_dtype, "bkqd,bksd->bkqs"), mask_bts, groups,
                   NEG_INF)
  p_bkqs = jnp.exp(s_bkqs - jnp.max(s_bkqs, -1, keepdims=True))
  p_bkqs = p_bkqs / jnp.sum(p_bkqs, -1, keepdims=True)
  o_bkqd = mm(p_bkqs, v_bksd, compute_dtype, "bkqs,bksd->bkqd")
  return o_bkqd, (q_bkqd, k_bksd, v_bksd, mask_bts, p_bkqs, o_bkqd)


def _softmax_attention_bwd(groups, compute_dtype, res, do_bkqd):
  q_bkqd, k_bksd, v_bksd, mask_bts, p_bkqs, o_bkqd = res
  dv_bksd = mm(p_bkqs, do_bkqd, compute_dtype, "bkqs,bkqd->bksd")
  dp_bkqs = mm(do_bkqd, v_bksd, compute_dtype, "bkqd,bksd->bkqs")
  ds_bkqs = p_bkqs * (dp_bkqs - jnp.sum(do_bkqd * o_bkqd, -1, keepdims=True))
  ds_bkqs = _masked(ds_bkqs, mask_bts, groups, 0.0)  # a row with no visible key: no gradient
  dq_bkqd = mm(ds_bkqs, k_bksd, compute_dtype, "bkqs,bksd->bkqd")
  dk_bksd = mm(ds_bkqs, q_bkqd, compute_dtype, "bkqs,bkqd->bksd")
  return (dq_bkqd.astype(q_bkqd.dtype), dk_bksd.astype(k_bksd.dtype),
          dv_bksd.astype(v_bksd.dtype), None)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def attend_heads_major(q_btnd, k_bksd, v_bksd, mask_bts, compute_dtype):
  """softmax(q k^T / sqrt(Dh), masked) v with head-major keys/values [B, KVH, S, Dh]
  -> [B, T, H * Dh] float32."""
  b, t, h, dh = q_btnd.shape
  kvh = k_bksd.shape[1]
  q_bkqd = _group_queries(q_btnd, kvh).reshape(b, kvh, h // kvh * t, dh)
  o_bkqd = _softmax_attention(q_bkqd, k_bksd, v_bksd, mask_bts, h // kvh, compute_dtype)
  return o_bkqd.reshape(b, kvh, h // kvh, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h * dh)


def attend(q_btnd, k_bskd, v_bskd, mask_bts, compute_dtype):
  """softmax(q k^T / sqrt(Dh), masked) v for grouped heads -> [B, T, H * Dh] float32."""
  return attend_heads_major(q_btnd, heads_major(k_bskd), heads_major(v_bskd), mask_bts,
                            compute_dtype)


def attend_shared_prefix(qc_rcnd, kp_pksd, vp_pksd, kc_rckd, vc_rckd, prompt_mask_ps,
                         own_mask_rcs, n: int, compute_dtype, common=None):
  """Completion rows [R = P * n, Lc] (row r continues prompt r // n) attending to their prompt's
  keys [P, KVH, Lp, Dh] (valid where prompt_mask_ps) and to their own, one softmax over both
  -> [R, Lc, H * Dh] float32. The prompt is projected once for its n rows; each row's key set
  is its prompt's keys then its own (a copy of [Lp, Dh] per kv head: small beside the row's
  [G * Lc, Lp] scores), so one batched product and one softmax serve all key sets.

  own_mask_rcs [R, Lc, Lc]: which of its own keys a row's query sees. `common` (k, v)
  [KVH, S, Dh]: keys every row also sees, before its prompt's (a prefix all P prompts share),
  in the same softmax."""
  r, lc = qc_rcnd.shape[:2]
  lp = kp_pksd.shape[2]

  def keys(xp_pksd, xc_rckd, xs_ksd):  # -> [R, KVH, (S +) Lp + Lc, Dh]
    parts = [jnp.repeat(xp_pksd, n, axis=0), heads_major(xc_rckd)]
    if xs_ksd is not None:
      parts.insert(0, jnp.broadcast_to(xs_ksd[None], (r,) + xs_ksd.shape))
    return jnp.concatenate(parts, axis=2)

  seen_rcp = jnp.broadcast_to(jnp.repeat(prompt_mask_ps > 0, n, axis=0)[:, None], (r, lc, lp))
  masks = [seen_rcp, own_mask_rcs]
  if common is not None:
    masks.insert(0, jnp.ones((r, lc, common[0].shape[1]), bool))
  return attend_heads_major(qc_rcnd, keys(kp_pksd, kc_rckd, None if common is None else common[0]),
                            keys(vp_pksd, vc_rckd, None if common is None else common[1]),
                            jnp.concatenate(masks, axis=-1), compute_dtype)


def attend_packed_rows(q_rcnd, k_rckd, v_rckd, mask_rcs, streams: int, head: int,
                       compute_dtype, common=None):
  """Rows [R = P * k, Lc] of P packed streams (k consecutive rows each), each row attending to
  its stream's first `head` slots (where a prompt lies), the row before it and itself: keys in
  that order, head + 2 * Lc a row, masked by mask_rcs [R, Lc, head + 2 * Lc] (the caller masks
  keys that two of those blocks share; a stream's first row has a previous row of zeros).
  `common` (k, v) [KVH, S, Dh]: keys every row also sees first, in the same softmax.
  -> [R, Lc, H * Dh] float32."""
  r, lc = q_rcnd.shape[:2]
  kvh, dh = k_rckd.shape[2:]
  k = r // streams

  def keys(x_rckd, xs_ksd):  # -> [R, KVH, (S +) head + 2 * Lc, Dh]
    x = heads_major(x_rckd).reshape(streams, k, kvh, lc, dh)
    first = x.transpose(0, 2, 1, 3, 4).reshape(streams, 1, kvh, k * lc, dh)[:, :, :, :head]
    prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :k]
    parts = [jnp.broadcast_to(first, (streams, k, kvh, head, dh)), prev, x]
    if xs_ksd is not None:
      parts.insert(0, jnp.broadcast_to(xs_ksd, (streams, k) + xs_ksd.shape))
    return jnp.concatenate(parts, axis=3).reshape(r, kvh, -1, dh)

  if common is not None:
    mask_rcs = jnp.concatenate([jnp.ones((r, lc, common[0].shape[1]), bool), mask_rcs], axis=-1)
  return attend_heads_major(q_rcnd, keys(k_rckd, None if common is None else common[0]),
                            keys(v_rckd, None if common is None else common[1]), mask_rcs,
                            compute_dtype)


def _attend_rows(q_btnd, k_btkd, v_btkd, mask_btt, compute_dtype, common=None):
  """Rows attending among themselves (mask_btt) and, with `common` (k, v) [KVH, S, Dh], also to
  a prefix before all of them, in one softmax: the B rows as the n samples of one "prompt",
  the prefix (attend_shared_prefix). -> [B, T, H * Dh] float32."""
  if common is None:
    return attend(q_btnd, k_btkd, v_btkd, mask_btt, compute_dtype)
  return attend_shared_prefix(q_btnd, common[0][None], common[1][None], k_btkd, v_btkd,
                              jnp.ones((1, common[0].shape[1]), bool), mask_btt, q_btnd.shape[0],
                              compute_dtype)


class Attention(nnx.Module):
  """q kernel [D, H*Dh] ("embed", "q_heads"); k/v [D, KVH*Dh] ("embed", "kv_heads");
  o [H*Dh, D] ("q_heads", "embed")."""

  def __init__(self, cfg: ModelConfig, kernels: dict[str, jax.Array]):
    """kernels: initial "q_proj" [D, H*Dh], "k_proj"/"v_proj" [D, KVH*Dh], "o_proj" [H*Dh, D]."""
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_proj = Linear(kernels["q_proj"], ("embed", "q_heads"), bias=cfg.qkv_bias)
    self.k_proj = Linear(kernels["k_proj"], ("embed", "kv_heads"), bias=cfg.qkv_bias)
    self.v_proj = Linear(kernels["v_proj"], ("embed", "kv_heads"), bias=cfg.qkv_bias)
    self.o_proj = Linear(kernels["o_proj"], ("q_heads", "embed"), bias=False)

  def qkv(self, x_btd, cos_btd, sin_btd, compute_dtype):
    """Projected, rotated q [B, T, H, Dh] and k, v [B, T, KVH, Dh] (float32)."""
    b, t, _ = x_btd.shape
    q = self.q_proj(x_btd, compute_dtype).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x_btd, compute_dtype).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x_btd, compute_dtype).reshape(b, t, self.num_kv_heads, self.head_dim)
    return apply_rope(q, cos_btd, sin_btd), apply_rope(k, cos_btd, sin_btd), v

  def __call__(self, x_btd, cos_btd, sin_btd, mask_btt, compute_dtype, common=None):
    """Full-sequence attention; mask_btt[b, t, s] says whether query t may see key s. `common`
    (k, v) [KVH, S, Dh]: the keys of a prefix before every row (`prefix_kv`), seen by all
    queries in the same softmax."""
    q, k, v = self.qkv(x_btd, cos_btd, sin_btd, compute_dtype)
    return self.o_proj(_attend_rows(q, k, v, mask_btt, compute_dtype, common), compute_dtype)

  def shared_prefix(self, xp_bpd, xc_bcd, rope_p, rope_c, mask_bpp, prompt_mask_bp, own_mask_bcs,
                    n: int, compute_dtype, common=None):
    """Prompts [P, Lp, D] and their completions [P*n, Lc, D] (row r continues prompt r // n):
    the prompts attend among themselves (mask_bpp); completion row r attends to prompt r // n's
    real tokens (prompt_mask_bp [P, Lp]), then to its own (own_mask_bcs [P*n, Lc, Lc]:
    attend_shared_prefix). Each prompt is projected once, not n times. `common` (k, v)
    [KVH, S, Dh]: the keys of a prefix that comes before every prompt (`prefix_kv`), seen by all
    queries."""
    qp, kp, vp = self.qkv(xp_bpd, *rope_p, compute_dtype)
    qc, kc, vc = self.qkv(xc_bcd, *rope_c, compute_dtype)
    out_p = _attend_rows(qp, kp, vp, mask_bpp, compute_dtype, common)
    kp, vp = heads_major(kp), heads_major(vp)
    out_c = attend_shared_prefix(qc, kp, vp, kc, vc, prompt_mask_bp, own_mask_bcs, n,
                                 compute_dtype, common)
    return self.o_proj(out_p, compute_dtype), self.o_proj(out_c, compute_dtype)

  def packed_rows(self, x_rcd, cos, sin, mask_rcs, streams, head, compute_dtype, common=None):
    """Rows of packed streams [R, Lc, D]: see attend_packed_rows."""
    q, k, v = self.qkv(x_rcd, cos, sin, compute_dtype)
    out = attend_packed_rows(q, k, v, mask_rcs, streams, head, compute_dtype, common)
    return self.o_proj(out, compute_dtype)

  def prefix_kv(self, x_1sd, cos, sin, compute_dtype):
    """Causal self-attention over one sequence [1, S, D] -> (output [1, S, D], its keys and
    values heads-major [KVH, S, Dh]): a common prefix's keys for `shared_prefix`'s `common`."""
    q, k, v = self.qkv(x_1sd, cos, sin, compute_dtype)
    k, v = heads_major(k), heads_major(v)
    s = x_1sd.shape[1]
    out = attend_heads_major(q, k, v, jnp.tril(jnp.ones((s, s), bool))[None], compute_dtype)
    return self.o_proj(out, compute_dtype), (k[0], v[0])

  def decode(self, x_btd, cos_btd, sin_btd, layer_cache, cache_index, mask_bts, compute_dtype):
    """Writes the T new keys/values at slots [cache_index, cache_index + T), attends over the
    cache. Returns (output [B, T, D], updated layer cache)."""
    q, k, v = self.qkv(x_btd, cos_btd, sin_btd, compute_dtype)
    ck, cv = layer_cache["k"], layer_cache["v"]
    start = (0, cache_index, 0, 0)
    ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
    out = self.o_proj(attend(q, ck, cv, mask_bts, compute_dtype), compute_dtype)
    return out, {"k": ck, "v": cv}
