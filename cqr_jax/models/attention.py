"""Grouped-query self-attention with RoPE and an optional functional KV cache.

Qwen2 adds biases to q/k/v (never to o); Llama has none. H query heads share KVH key/value heads
in groups of G = H / KVH. Scores and softmax are float32; masked scores are replaced (not added)
by a large negative number, so a row with no visible key stays finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cqr_jax.models.config import ModelConfig
from cqr_jax.models.layers import Linear, mm
from cqr_jax.models.rope import apply_rope

NEG_INF = -1e30


def attend(q_btnd, k_bskd, v_bskd, mask_bts, compute_dtype):
  """softmax(q k^T / sqrt(Dh), masked) v for grouped heads -> [B, T, H * Dh] float32."""
  b, t, h, dh = q_btnd.shape
  kvh = k_bskd.shape[2]
  q_btkgd = q_btnd.reshape(b, t, kvh, h // kvh, dh) * (dh ** -0.5)
  s_bkgts = mm(q_btkgd, k_bskd, compute_dtype, "btkgd,bskd->bkgts")
  s_bkgts = jnp.where(mask_bts[:, None, None], s_bkgts, NEG_INF)
  p_bkgts = jax.nn.softmax(s_bkgts, axis=-1)
  o_btkgd = mm(p_bkgts, v_bskd, compute_dtype, "bkgts,bskd->btkgd")
  return o_btkgd.reshape(b, t, h * dh)


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

  def __call__(self, x_btd, cos_btd, sin_btd, mask_btt, compute_dtype):
    """Full-sequence attention; mask_btt[b, t, s] says whether query t may see key s."""
    q, k, v = self.qkv(x_btd, cos_btd, sin_btd, compute_dtype)
    return self.o_proj(attend(q, k, v, mask_btt, compute_dtype), compute_dtype)

  def shared_prefix(self, xp_bpd, xc_bcd, rope_p, rope_c, mask_bpp, mask_bcs, n: int,
                    compute_dtype):
    """Prompts [P, Lp, D] and their completions [P*n, Lc, D] (row r continues prompt r // n):
    the prompts attend among themselves; completion row r attends to prompt r // n's keys, then
    to its own (mask_bcs [P*n, Lc, Lp + Lc]). Each prompt is projected once, not n times."""
    qp, kp, vp = self.qkv(xp_bpd, *rope_p, compute_dtype)
    qc, kc, vc = self.qkv(xc_bcd, *rope_c, compute_dtype)
    out_p = attend(qp, kp, vp, mask_bpp, compute_dtype)
    k = jnp.concatenate([jnp.repeat(kp, n, axis=0), kc], axis=1)
    v = jnp.concatenate([jnp.repeat(vp, n, axis=0), vc], axis=1)
    out_c = attend(qc, k, v, mask_bcs, compute_dtype)
    return self.o_proj(out_p, compute_dtype), self.o_proj(out_c, compute_dtype)

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
