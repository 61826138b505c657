"""The sampler's KV-cache forward passes: prefill of B prompts, then decode steps for B * n rows.

The cache is split in two, per layer:
- prompt part {"k", "v"}: [B, KVH, P, Dh], written once by the prefill and shared by the n
  samples of each prompt (never repeated n times: n-fold less memory and fewer bytes read per
  step for the prompt slots, which dominate in GRPO: 1,536-token prompts, n = 8-16);
- generation part {"k", "v"}: [B * n, KVH, G, Dh], one slot written per step, in place.
Rows are prompt-major (row i * n + j = sample j of prompt i). Head-major layouts make both
attention matmuls plain batched matmuls over (B, KVH); the [B, S, KVH, Dh] layout of
`Decoder.decode` makes XLA:CPU transpose the whole cache every layer and step (5-6x slower
attention at batch 64; bench/results/sampler.md). A decode step's softmax runs jointly over the
prompt and generation slots: the same attention as one concatenated cache.

Projections, norms, RoPE, MLP and LM head are the Decoder's own modules. A model without that
structure falls back to its `init_cache` / `decode` (full cache repeated n times).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cqr_jax.models.attention import NEG_INF, attend_heads_major, heads_major, joint_softmax
from cqr_jax.models.decoder import scan_blocks
from cqr_jax.models.layers import mm


def fast_path_ok(model) -> bool:
  """Whether `model` has the Decoder structure the split-cache passes use."""
  layers = getattr(model, "layers", None)
  if not layers:
    return False
  layer = layers[0]
  return (all(hasattr(model, a) for a in ("_rope", "_cdt", "embed", "final_norm", "logits",
                                          "config"))
          and all(hasattr(layer, a) for a in ("attn_norm", "attn", "mlp_norm", "mlp"))
          and hasattr(layer.attn, "qkv") and hasattr(layer.attn, "o_proj"))


def _attend_step(q_r1nd, prompt, gen, prompt_mask_bp, step, n, dt, value_product):
  """One query per row over its prompt's slots and its own generated slots [0, step]:
  [R, 1, H * Dh] f32. Matmuls in `dt` (the cache dtype: no per-step cast of the cache).

  value_product "reduce": the probability-weighted sums of the values as a broadcast multiply
  and a sum over the slots, which XLA:CPU fuses into one loop; its batched matmul runs B * KVH
  products of only G (or n * G) rows each (30 SmolLM2 layers at batch 16: 72 -> 42 ms per step,
  bench/results/sampler.md). "matmul": einsums, for matrix units (TPU, GPU)."""
  r, _, h, dh = q_r1nd.shape
  b, kvh, _, _ = prompt["k"].shape
  g = h // kvh
  q_rkgd = q_r1nd.reshape(r, kvh, g, dh) * (dh ** -0.5)
  s_bnkgp = mm(q_rkgd.reshape(b, n, kvh, g, dh), prompt["k"], dt, "bnkgd,bkpd->bnkgp")
  s_bnkgp = jnp.where(prompt_mask_bp[:, None, None, None, :], s_bnkgp, NEG_INF)
  s_rkgs = mm(q_rkgd, gen["k"], dt, "rkgd,rksd->rkgs")
  s_rkgs = jnp.where(jnp.arange(s_rkgs.shape[-1]) <= step, s_rkgs, NEG_INF)
  s_bnkgs = s_rkgs.reshape(b, n, kvh, g, -1)
  p_bnkgp, p_bnkgs = joint_softmax(s_bnkgp, s_bnkgs)
  p_rkgs = p_bnkgs.reshape(r, kvh, g, -1)
  if value_product == "reduce":
    f32 = jnp.float32
    o_bnkgd = jnp.sum(p_bnkgp[..., None] * prompt["v"].astype(f32)[:, None, :, None], axis=-2)
    o_rkgd = jnp.sum(p_rkgs[..., None] * gen["v"].astype(f32)[:, :, None], axis=-2)
  else:
    o_bnkgd = mm(p_bnkgp, prompt["v"], dt, "bnkgp,bkpd->bnkgd")
    o_rkgd = mm(p_rkgs, gen["v"], dt, "rkgs,rksd->rkgd")
  return (o_bnkgd.reshape(r, kvh, g, dh) + o_rkgd).reshape(r, 1, h * dh)


def _scan(model) -> bool:
  return bool(getattr(model.config, "scan_layers", False))


def prefill(model, tokens_bp, positions_bp, mask_bp, compute_dtype, cache_dtype):
  """Left-padded prompts -> (f32 logits [B, V] of the last position, prompt cache: per layer
  {"k", "v"} [B, KVH, P, Dh], or one dict of [L, B, KVH, P, Dh] with config.scan_layers)."""
  cdt = model._cdt(compute_dtype)
  p = tokens_bp.shape[1]
  mask_bpp = jnp.tril(jnp.ones((p, p), bool))[None] & mask_bp[:, None, :]
  cos, sin = model._rope(positions_bp)

  def block(layer, x_bpd, _):
    q, k, v = layer.attn.qkv(layer.attn_norm(x_bpd), cos, sin, cdt)
    k_bkpd, v_bkpd = heads_major(k), heads_major(v)
    x_bpd = x_bpd + layer.attn.o_proj(attend_heads_major(q, k_bkpd, v_bkpd, mask_bpp, cdt), cdt)
    x_bpd = x_bpd + layer.mlp(layer.mlp_norm(x_bpd), cdt)
    return x_bpd, {"k": k_bkpd.astype(cache_dtype), "v": v_bkpd.astype(cache_dtype)}

  x_bpd = model.embed(tokens_bp)
  if _scan(model):
    x_bpd, cache = scan_blocks(model.layers, block, x_bpd)
  else:
    cache = []
    for layer in model.layers:
      x_bpd, layer_cache = block(layer, x_bpd, None)
      cache.append(layer_cache)
  logits_b1v = model.logits(model.final_norm(x_bpd[:, -1:]), compute_dtype=compute_dtype)
  return logits_b1v[:, 0].astype(jnp.float32), cache


def init_gen_cache(cfg, rows: int, gen_len: int, dtype):
  """Zeroed generation cache: per layer {"k", "v"} [R, KVH, G, Dh], or stacked [L, R, KVH, G, Dh]
  with cfg.scan_layers."""
  shape = (rows, cfg.num_kv_heads, gen_len, cfg.head_dim)
  if getattr(cfg, "scan_layers", False):
    shape = (cfg.num_layers, *shape)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for _ in range(cfg.num_layers)]


def decode_step(model, tokens_r, positions_r, prompt_cache, gen_cache, step, prompt_mask_bp, n,
                compute_dtype, value_product):
  """Row r's token at position positions_r[r] into generation slot `step`:
  (f32 logits [R, V], updated generation cache)."""
  cdt = model._cdt(compute_dtype)
  cos, sin = model._rope(positions_r[:, None])

  def block(layer, x_r1d, pc, write):
    """One layer; `write(k, v)` stores the new [R, KVH, 1, Dh] K/V and returns the layer's
    generation cache to attend over plus the updated storage."""
    q, k, v = layer.attn.qkv(layer.attn_norm(x_r1d), cos, sin, cdt)
    gc, stored = write(heads_major(k), heads_major(v))
    o = _attend_step(q, pc, gc, prompt_mask_bp, step, n, gc["k"].dtype, value_product)
    x_r1d = x_r1d + layer.attn.o_proj(o, cdt)
    return x_r1d + layer.mlp(layer.mlp_norm(x_r1d), cdt), stored

  x_r1d = model.embed(tokens_r[:, None])
  if _scan(model):
    # The stacked caches are read-only scan inputs; each layer attends over a local copy of its
    # slice with the new slot written, and emits the new K/V. The stacked generation cache gets
    # all layers' slots in one write after the scan (writing it inside the scan made XLA copy
    # the whole stacked cache once per layer: 3x slower steps).
    def body(layer, x_r1d, xs):
      pc, gk, gv = xs

      def write(k, v):
        at = (0, 0, step, 0)
        return {"k": jax.lax.dynamic_update_slice(gk, k.astype(gk.dtype), at),
                "v": jax.lax.dynamic_update_slice(gv, v.astype(gv.dtype), at)}, (k, v)

      return block(layer, x_r1d, pc, write)

    x_r1d, (k_l, v_l) = scan_blocks(model.layers, body, x_r1d,
                                    (prompt_cache, gen_cache["k"], gen_cache["v"]))
    at = (0, 0, 0, step, 0)
    new = {"k": jax.lax.dynamic_update_slice(gen_cache["k"], k_l.astype(gen_cache["k"].dtype), at),
           "v": jax.lax.dynamic_update_slice(gen_cache["v"], v_l.astype(gen_cache["v"].dtype), at)}
  else:
    new = []
    for layer, pc, gc in zip(model.layers, prompt_cache, gen_cache):
      def write(k, v, gc=gc):
        at = (0, 0, step, 0)
        gc = {"k": jax.lax.dynamic_update_slice(gc["k"], k.astype(gc["k"].dtype), at),
              "v": jax.lax.dynamic_update_slice(gc["v"], v.astype(gc["v"].dtype), at)}
        return gc, gc

      x_r1d, gc = block(layer, x_r1d, pc, write)
      new.append(gc)
  logits_r1v = model.logits(model.final_norm(x_r1d), compute_dtype=compute_dtype)
  return logits_r1v[:, 0].astype(jnp.float32), new


def make_steps(model, *, n: int, gen_len: int, cache_dtype, prefill_dtype, compute_dtype,
               value_product: str, constrain=lambda x: x):
  """(prefill_fn, decode_fn) for the generation loop.

  prefill_fn(tokens_bp, positions_bp, mask_bp) -> (logits [B * n, V], state);
  decode_fn(tokens_r, positions_r, state, step) -> (logits [R, V], state). `state` is the
  cache pytree (rows sharded like the batch through `constrain`). `value_product`: see
  `_attend_step` (the generic path ignores it).
  """
  if fast_path_ok(model):
    cache_dt = jnp.dtype(cache_dtype) if cache_dtype is not None else model._cdt(None)

    def prefill_fn(tokens_bp, positions_bp, mask_bp):
      logits_bv, pc = prefill(model, tokens_bp, positions_bp, mask_bp, prefill_dtype, cache_dt)
      rows = tokens_bp.shape[0] * n
      gc = init_gen_cache(model.config, rows, gen_len, cache_dt)
      state = (jax.tree.map(constrain, pc), jax.tree.map(constrain, gc), mask_bp)
      return jnp.repeat(logits_bv, n, axis=0), state

    def decode_fn(tokens_r, positions_r, state, step):
      pc, gc, mask_bp = state
      logits_rv, gc = decode_step(model, tokens_r, positions_r, pc, gc, step, mask_bp, n,
                                  compute_dtype, value_product)
      return logits_rv, (pc, gc, mask_bp)
    return prefill_fn, decode_fn

  def prefill_generic(tokens_bp, positions_bp, mask_bp):
    b, p = tokens_bp.shape
    kv_valid_bs = jnp.concatenate([mask_bp, jnp.ones((b, gen_len), bool)], axis=-1)
    cache = model.init_cache(b, p + gen_len, dtype=cache_dtype)
    logits, cache = model.decode(tokens_bp, positions_bp, cache, 0, kv_valid_bs,
                                 compute_dtype=prefill_dtype)
    cache = jax.tree.map(lambda x: constrain(jnp.repeat(x, n, axis=0)), cache)
    kv_valid_rs = constrain(jnp.repeat(kv_valid_bs, n, axis=0))
    state = (cache, kv_valid_rs, jnp.int32(p))
    return jnp.repeat(logits[:, -1].astype(jnp.float32), n, axis=0), state

  def decode_generic(tokens_r, positions_r, state, step):
    cache, kv_valid_rs, p = state
    logits, cache = model.decode(tokens_r[:, None], positions_r[:, None], cache, p + step,
                                 kv_valid_rs, compute_dtype=compute_dtype)
    return logits[:, 0].astype(jnp.float32), (cache, kv_valid_rs, p)
  return prefill_generic, decode_generic
