"""Grouped-query self-attention with RoPE: one attention entry point (`attend`) and the layouts
that say which keys a forward pass's queries see (`Decoder.forward`).

Qwen2 adds biases to q/k/v (never to o); Llama has none. H query heads share KVH key/value heads
in groups of G = H / KVH. Scores and softmax are float32; masked scores are replaced (not added)
by a large negative number, so a row with no visible key stays finite.

The products run head-major: queries as [B, KVH, G * T, Dh] against keys/values [B, KVH, S, Dh],
so both are plain batched matmuls over (B, KVH) and their gradients need no transposes of the
[.., T, S] scores (bench/results/update.md). Training and prefill attention run one softmax
over one key set per row (key sets such as a prefix's and a row's own are concatenated, not
combined part by part) with its own backward rule (`_softmax_attention`); the sampler's decode
step, which must not copy a shared prefix's keys per row, combines parts (`joint_softmax`).
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


KERNELS = ("xla",)


def attend(q_btnd, k_bksd, v_bksd, mask_bts, compute_dtype, *, kernel: str = "xla"):
  """The attention entry point of every forward pass: softmax(q k^T / sqrt(Dh), masked) v of
  queries [B, T, H, Dh] over head-major keys/values [B, KVH, S, Dh], mask_bts [B, T, S] (True =
  visible) -> [B, T, H * Dh] float32.

  kernel "xla": grouped head-major products with the softmax's own backward rule
  (`_softmax_attention`). The place for a Pallas / splash kernel on TPU. (The sampler's decode
  step reads a split KV cache part by part: cqr_jax/sampler_kv.py.)"""
  if kernel != "xla":
    raise ValueError(f"attention kernel {kernel!r}: expected one of {KERNELS}")
  b, t, h, dh = q_btnd.shape
  kvh = k_bksd.shape[1]
  q_bkqd = _group_queries(q_btnd, kvh).reshape(b, kvh, h // kvh * t, dh)
  o_bkqd = _softmax_attention(q_bkqd, k_bksd, v_bksd, mask_bts, h // kvh, compute_dtype)
  return o_bkqd.reshape(b, kvh, h // kvh, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h * dh)


# ------------------------------------------------------------------------------------ layouts
# A layout says which keys each query of a forward pass sees. `Decoder.forward` calls it in every
# block as layout(q [B, T, H, Dh], k, v [B, T, KVH, Dh], inputs_l, compute_dtype) ->
# (output [B, T, H * Dh] float32, what the block hands back, e.g. its keys for a cache);
# inputs_l is the block's slice of the forward's `layer_inputs` (e.g. a prefix's keys).


def _with_prefix(k_bksd, v_bksd, mask_bts, prefix):
  """Keys of a prefix every row sees, (k, v) [KVH, S', Dh], put before each row's own."""
  if prefix is None:
    return k_bksd, v_bksd, mask_bts
  b, t = mask_bts.shape[:2]
  kp, vp = (jnp.broadcast_to(x[None], (b,) + x.shape) for x in prefix)
  return (jnp.concatenate([kp, k_bksd], axis=2), jnp.concatenate([vp, v_bksd], axis=2),
          jnp.concatenate([jnp.ones((b, t, kp.shape[2]), bool), mask_bts], axis=-1))


def rows_layout(mask_btt, *, keep_kv: bool = False):
  """Each row attends among its own tokens (mask_btt [B, T, T], e.g. causal and padding) and,
  when the block's input is a prefix's (k, v) [KVH, S, Dh], also to those keys first, in one
  softmax. `keep_kv`: the block hands back its own keys/values heads-major [B, KVH, T, Dh]."""
  def layout(q, k, v, prefix, cdt):
    k, v = heads_major(k), heads_major(v)
    o = attend(q, *_with_prefix(k, v, mask_btt, prefix), cdt)
    return o, ((k, v) if keep_kv else None)
  return layout


def causal_rows(mask_bt, *, keep_kv: bool = False):
  """`rows_layout` with the causal mask of right- or left-padded rows (mask_bt: 1 = real)."""
  t = mask_bt.shape[1]
  return rows_layout(jnp.tril(jnp.ones((t, t), bool))[None] & (mask_bt[:, None, :] > 0),
                     keep_kv=keep_kv)


def context_rows(context_mask_gs, own_mask_rcc, n: int):
  """Rows [R = G * n, C] continuing a context of S keys (a prompt's, a KV cache): row r
  attends to context r // n's keys where context_mask_gs [G, S] is set, then to its own
  (own_mask_rcc [R, C, C]), in one softmax. The block's input is the contexts' (k, v)
  [G, KVH, S, Dh] (a `causal_rows(keep_kv=True)` pass hands them back), each copied to its n
  rows: small beside a row's [G * C, S] scores, and one batched product serves all key sets."""
  def layout(q, k, v, context, cdt):
    r, c = own_mask_rcc.shape[:2]
    kc, vc = (jnp.repeat(x, n, axis=0) for x in context)
    seen_rcs = jnp.broadcast_to(jnp.repeat(context_mask_gs > 0, n, axis=0)[:, None],
                                (r, c, kc.shape[2]))
    keys = jnp.concatenate([kc, heads_major(k)], axis=2)
    values = jnp.concatenate([vc, heads_major(v)], axis=2)
    return attend(q, keys, values, jnp.concatenate([seen_rcs, own_mask_rcc], axis=-1), cdt), None
  return layout


def packed_layout(mask_rcs, streams: int, head: int):
  """Rows [R = P * k, Lc] of P packed streams (k consecutive rows each), each row attending to
  its stream's first `head` slots (where a prompt lies), the row before it and itself: keys in
  that order, head + 2 * Lc a row, masked by mask_rcs [R, Lc, head + 2 * Lc] (the caller masks
  keys that two of those blocks share; a stream's first row has a previous row of zeros); and,
  with a prefix's (k, v) as the block's input, those keys first."""
  def keys(x_rckd):  # -> [R, KVH, head + 2 * Lc, Dh]
    r, lc, kvh, dh = x_rckd.shape
    k = r // streams
    x = heads_major(x_rckd).reshape(streams, k, kvh, lc, dh)
    first = x.transpose(0, 2, 1, 3, 4).reshape(streams, 1, kvh, k * lc, dh)[:, :, :, :head]
    prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :k]
    parts = [jnp.broadcast_to(first, (streams, k, kvh, head, dh)), prev, x]
    return jnp.concatenate(parts, axis=3).reshape(r, kvh, -1, dh)

  def layout(q, k, v, prefix, cdt):
    return attend(q, *_with_prefix(keys(k), keys(v), mask_rcs, prefix), cdt), None
  return layout


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

  def __call__(self, x_btd, rope, layout, inputs, compute_dtype):
    """x [B, T, D] -> (output [B, T, D], what the layout hands back); `rope` = (cos, sin) of
    the tokens' positions, `layout` and its block `inputs`: see the layouts above."""
    q, k, v = self.qkv(x_btd, *rope, compute_dtype)
    o_btf, out = layout(q, k, v, inputs, compute_dtype)
    return self.o_proj(o_btf, compute_dtype), out
