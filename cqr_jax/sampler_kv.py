"""The sampler's KV-cache forward passes: prefill of B prompts, then decode steps for B * n rows.

The cache is split in two, per layer:
- prompt part {"k", "v"}: [B, KVH, P, Dh], written once by the prefill and shared by the n
  samples of each prompt (never repeated n times: n-fold less memory and fewer bytes read per
  step for the prompt slots, which dominate in GRPO: 1,536-token prompts, n = 8-16); when the
  prompts share a prefix (`prefill` `shared`), that prefix is held once for all rows in
  "shared_k", "shared_v" [KVH, S, Dh] and "k", "v" hold each prompt's remaining columns;
- generation part {"k", "v"}: [B * n, KVH, G, Dh], one slot written per step, in place; with
  the "reduce" attention (CPU) "k" is stored [B * n, KVH, Dh, G] (`gen_k_slots_last`).
Rows are prompt-major (row i * n + j = sample j of prompt i). Head-major layouts make both
attention matmuls plain batched matmuls over (B, KVH); the [B, S, KVH, Dh] layout of
`Decoder.decode` makes XLA:CPU transpose the whole cache every layer and step (slower
attention; bench/results/sampler.md). A decode step's softmax runs jointly over the
prompt and generation slots: the same attention as one concatenated cache.

Projections, norms, RoPE, MLP and LM head are the Decoder's own modules. A model without that
structure falls back to its `init_cache` / `decode` (full cache repeated n times).

Under a mesh (`jax.set_mesh`, as `Sampler` calls the program), the residual stream between blocks
and the caches keep their rows on ("data", "fsdp") (`cqr_jax.sharding.constrain_rows`).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from cqr_jax import sharding
from cqr_jax.models import layers
from cqr_jax.models.attention import (
  NEG_INF,
  attend_heads_major,
  attend_shared_prefix,
  heads_major,
  joint_softmax,
)
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


ATTENTION_MODES = ("reduce", "matmul")


def gen_k_slots_last(attention: str) -> bool:
  """Whether the generation cache stores keys [R, KVH, Dh, G] (slots minor) for this mode."""
  return attention == "reduce"


def _attend_step(q_r1nd, prompt, gen, prompt_mask_bp, step, n, dt, attention):
  """One query per row over its prompt's slots and its own generated slots [0, step]:
  [R, 1, H * Dh] f32. Matmuls in `dt` (the cache dtype: no per-step cast of the cache).

  attention "reduce" (XLA:CPU): the products that XLA:CPU runs as many tiny batched matmuls
  (B * KVH or R * KVH products of G or n * G rows) become broadcast multiplies and sums that it
  fuses into one loop each: the value sums of both parts and the generated part's scores, with
  its keys stored slots-minor [R, KVH, Dh, G] so the sum over Dh runs across whole rows of slots
  (bench/results/sampler.md). The prompt part's scores stay a matmul: its keys meet n * G
  queries. "matmul": einsums throughout, for matrix units (TPU, GPU)."""
  r, _, h, dh = q_r1nd.shape
  b, kvh, _, _ = prompt["k"].shape
  g = h // kvh
  q_rkgd = q_r1nd.reshape(r, kvh, g, dh) * (dh ** -0.5)
  s_bnkgp = mm(q_rkgd.reshape(b, n, kvh, g, dh), prompt["k"], dt, "bnkgd,bkpd->bnkgp")
  s_bnkgp = jnp.where(prompt_mask_bp[:, None, None, None, :], s_bnkgp, NEG_INF)
  if attention == "reduce":  # gen["k"]: [R, KVH, Dh, G]
    s_rkgs = jnp.sum(q_rkgd.astype(dt)[..., None] * gen["k"][:, :, None], axis=-2)
  else:
    s_rkgs = mm(q_rkgd, gen["k"], dt, "rkgd,rksd->rkgs")
  s_rkgs = jnp.where(jnp.arange(s_rkgs.shape[-1]) <= step, s_rkgs, NEG_INF)
  s_bnkgs = s_rkgs.reshape(b, n, kvh, g, -1)
  shared = "shared_k" in prompt
  if shared:  # every row's query against the one copy of the common prefix's keys [KVH, S, Dh]
    q_kqd = q_rkgd.transpose(1, 0, 2, 3).reshape(kvh, r * g, dh)
    s_kqs = mm(q_kqd, prompt["shared_k"], dt, "kqd,ksd->kqs")
    s_bnkgc = s_kqs.reshape(kvh, b, n, g, -1).transpose(1, 2, 0, 3, 4)
    p_bnkgc, p_bnkgp, p_bnkgs = joint_softmax(s_bnkgc, s_bnkgp, s_bnkgs)
  else:
    p_bnkgp, p_bnkgs = joint_softmax(s_bnkgp, s_bnkgs)
  p_rkgs = p_bnkgs.reshape(r, kvh, g, -1)
  if attention == "reduce":
    f32 = jnp.float32
    o_bnkgd = jnp.sum(p_bnkgp[..., None] * prompt["v"].astype(f32)[:, None, :, None], axis=-2)
    o_rkgd = jnp.sum(p_rkgs[..., None] * gen["v"].astype(f32)[:, :, None], axis=-2)
  else:
    o_bnkgd = mm(p_bnkgp, prompt["v"], dt, "bnkgp,bkpd->bnkgd")
    o_rkgd = mm(p_rkgs, gen["v"], dt, "rkgs,rksd->rkgd")
  o_rkgd = o_bnkgd.reshape(r, kvh, g, dh) + o_rkgd
  if shared:
    p_kqc = p_bnkgc.transpose(2, 0, 1, 3, 4).reshape(kvh, r * g, -1)
    o_kqd = mm(p_kqc, prompt["shared_v"], dt, "kqc,kcd->kqd")
    o_rkgd = o_rkgd + o_kqd.reshape(kvh, r, g, dh).transpose(1, 0, 2, 3)
  return o_rkgd.reshape(r, 1, h * dh)


def prefill(model, tokens_bp, positions_bp, mask_bp, compute_dtype, cache_dtype, scan: bool,
            shared: int = 0):
  """Left-padded prompts -> (f32 logits [B, V] of the last position, prompt cache: per layer
  {"k", "v"} [B, KVH, P, Dh], or with `scan` (the blocks as one lax.scan) one dict of
  [L, B, KVH, P, Dh]).

  `shared` > 0: the first `shared` columns hold the same tokens in every row, all valid (the
  prompts' common prefix: a template's instructions; `Sampler` lays prompts out so). The blocks
  then run once over that prefix (batch 1) and once over the B rows' remaining columns, which
  attend to the prefix's keys without repeating them (`attend_shared_prefix`): (B - 1) * shared
  fewer tokens through the model. The prompt cache then holds the rows' own P - shared columns
  in "k", "v" and the prefix once in "shared_k", "shared_v" [KVH, shared, Dh] ([L, ...] with
  `scan`), which decode steps read once for all rows (`_attend_step`)."""
  cdt = model._cdt(compute_dtype)
  b, p = tokens_bp.shape
  s = shared
  cos, sin = model._rope(positions_bp[:, s:])
  own_bqq = jnp.tril(jnp.ones((p - s, p - s), bool))[None] & mask_bp[:, None, s:]

  def attend(layer, x_bqd, cos, sin, mask, kv_prefix):
    """One block's attention + MLP over x, keys masked by `mask` [B, Q, Q]; kv_prefix: the
    prefix's heads-major (k, v), which every query also sees, or None.
    Returns (x, (k, v)) with k, v [B, KVH, Q, Dh] in the projection's dtype."""
    q, k, v = layer.attn.qkv(layer.attn_norm(x_bqd), cos, sin, cdt)
    if kv_prefix is None:
      o = attend_heads_major(q, heads_major(k), heads_major(v), mask, cdt)
    else:
      kp, vp = kv_prefix
      o = attend_shared_prefix(q, kp, vp, k, v, jnp.ones((1, s), bool), mask, b, cdt)
    x_bqd = x_bqd + layer.attn.o_proj(o, cdt)
    x_bqd = sharding.constrain_rows(x_bqd + layer.mlp(layer.mlp_norm(x_bqd), cdt))
    return x_bqd, (heads_major(k), heads_major(v))

  def cache_of(kv_prefix, kv):
    k, v = kv
    cache = {"k": k.astype(cache_dtype), "v": v.astype(cache_dtype)}
    if kv_prefix is not None:  # [..., 1, KVH, S, Dh] -> [..., KVH, S, Dh]
      cache["shared_k"] = kv_prefix[0][..., 0, :, :, :].astype(cache_dtype)
      cache["shared_v"] = kv_prefix[1][..., 0, :, :, :].astype(cache_dtype)
    return cache

  def run(x, cos, sin, mask, kv_prefix):
    """The blocks over x ([1, S, D] prefix or [B, Q, D] rows) -> (x, per-layer (k, v) or, with
    `scan`, (k, v) stacked on [L])."""
    if scan:
      return scan_blocks(model.layers,
                         lambda layer, x, kvp: attend(layer, x, cos, sin, mask, kvp), x, kv_prefix)
    kvs = []
    for i, layer in enumerate(model.layers):
      x, kv = attend(layer, x, cos, sin, mask, None if kv_prefix is None else kv_prefix[i])
      kvs.append(kv)
    return x, kvs

  kv_prefix = None
  if s:
    cos_p, sin_p = model._rope(positions_bp[:1, :s])
    kv_prefix = run(model.embed(tokens_bp[:1, :s]), cos_p, sin_p,
                    jnp.tril(jnp.ones((s, s), bool))[None], None)[1]
  x_bqd, kv = run(sharding.constrain_rows(model.embed(tokens_bp[:, s:])), cos, sin, own_bqq,
                  kv_prefix)
  if scan:
    cache = cache_of(kv_prefix, kv)
  else:
    cache = [cache_of(kvp, kvl) for kvp, kvl in zip(kv_prefix or [None] * len(kv), kv)]
  logits_b1v = model.logits(model.final_norm(x_bqd[:, -1:]), compute_dtype=compute_dtype)
  return logits_b1v[:, 0].astype(jnp.float32), cache


def map_rows(cache, fn):
  """`fn` on each per-row cache entry (per layer, or stacked); the common prefix's "shared_"
  entries (one copy for all rows) are kept as they are."""
  def one(d):
    return {k: x if k.startswith("shared_") else fn(x) for k, x in d.items()}
  return one(cache) if isinstance(cache, dict) else list(map(one, cache))


def constrain_cache(cache, scan: bool):
  """The per-row cache entries with their rows (axis 0, or 1 under a stacked [L] with `scan`)
  sharded as the batch (`sharding.constrain_rows`); the common prefix's one copy is left as it
  is (replicated)."""
  return map_rows(cache, lambda x: sharding.constrain_rows(x, axis=1 if scan else 0))


def take_rows(cache, idx_r, scan: bool):
  """The cache entries' rows `idx_r` [R'] (axis 0, or 1 under a stacked [L] with `scan`), the
  common prefix's kept whole. On the prompt cache with prompt indices, this gives each kept row
  its own copy of its prompt's slots."""
  return map_rows(cache, lambda x: jnp.take(x, idx_r, axis=1 if scan else 0))


def init_gen_cache(cfg, rows: int, gen_len: int, dtype, attention: str, scan: bool):
  """Zeroed generation cache: per layer {"k", "v"} [R, KVH, G, Dh] ("k" [R, KVH, Dh, G] when
  `gen_k_slots_last(attention)`), or one dict of those stacked on a leading [L] with `scan`."""
  v_shape = (rows, cfg.num_kv_heads, gen_len, cfg.head_dim)
  k_shape = ((rows, cfg.num_kv_heads, cfg.head_dim, gen_len) if gen_k_slots_last(attention)
             else v_shape)
  if scan:
    return {"k": jnp.zeros((cfg.num_layers, *k_shape), dtype),
            "v": jnp.zeros((cfg.num_layers, *v_shape), dtype)}
  return [{"k": jnp.zeros(k_shape, dtype), "v": jnp.zeros(v_shape, dtype)}
          for _ in range(cfg.num_layers)]


def _write_slot(k_cache, v_cache, k_rk1d, v_rk1d, step, attention):
  """Writes one step's keys/values [..., R, KVH, 1, Dh] into slot `step` of the generation
  cache (leading axes, e.g. a stacked [L], are written whole)."""
  lead = (0,) * (k_cache.ndim - 4)
  if gen_k_slots_last(attention):
    k_new, k_at = k_rk1d.swapaxes(-1, -2), lead + (0, 0, 0, step)
  else:
    k_new, k_at = k_rk1d, lead + (0, 0, step, 0)
  v_at = lead + (0, 0, step, 0)
  return (jax.lax.dynamic_update_slice(k_cache, k_new.astype(k_cache.dtype), k_at),
          jax.lax.dynamic_update_slice(v_cache, v_rk1d.astype(v_cache.dtype), v_at))


def decode_step(model, tokens_r, positions_r, prompt_cache, gen_cache, step, prompt_mask_bp, n,
                compute_dtype, attention, scan):
  """Row r's token at position positions_r[r] into generation slot `step`:
  (f32 logits [R, V], updated generation cache)."""
  cdt = model._cdt(compute_dtype)
  cos, sin = model._rope(positions_r[:, None])

  def block(layer, x_r1d, pc, write):
    """One layer; `write(k, v)` stores the new [R, KVH, 1, Dh] K/V and returns the layer's
    generation cache to attend over plus the updated storage."""
    q, k, v = layer.attn.qkv(layer.attn_norm(x_r1d), cos, sin, cdt)
    gc, stored = write(heads_major(k), heads_major(v))
    o = _attend_step(q, pc, gc, prompt_mask_bp, step, n, gc["k"].dtype, attention)
    x_r1d = x_r1d + layer.attn.o_proj(o, cdt)
    return sharding.constrain_rows(x_r1d + layer.mlp(layer.mlp_norm(x_r1d), cdt)), stored

  x_r1d = sharding.constrain_rows(model.embed(tokens_r[:, None]))
  if scan:
    # The stacked caches are read-only scan inputs; each layer attends over a local copy of its
    # slice with the new slot written, and emits the new K/V. The stacked generation cache gets
    # all layers' slots in one write after the scan (writing it inside the scan made XLA copy
    # the whole stacked cache once per layer; `python bench/bench_decode_layers.py`).
    def body(layer, x_r1d, xs):
      pc, gk, gv = xs

      def write(k, v):
        lk, lv = _write_slot(gk, gv, k, v, step, attention)
        return {"k": lk, "v": lv}, (k, v)

      return block(layer, x_r1d, pc, write)

    x_r1d, (k_l, v_l) = scan_blocks(model.layers, body, x_r1d,
                                    (prompt_cache, gen_cache["k"], gen_cache["v"]))
    new_k, new_v = _write_slot(gen_cache["k"], gen_cache["v"], k_l, v_l, step, attention)
    new = {"k": new_k, "v": new_v}
  else:
    new = []
    for layer, pc, gc in zip(model.layers, prompt_cache, gen_cache):
      def write(k, v, gc=gc):
        new_k, new_v = _write_slot(gc["k"], gc["v"], k, v, step, attention)
        gc = {"k": new_k, "v": new_v}
        return gc, gc

      x_r1d, gc = block(layer, x_r1d, pc, write)
      new.append(gc)
  logits_r1v = model.logits(model.final_norm(x_r1d), compute_dtype=compute_dtype)
  return logits_r1v[:, 0].astype(jnp.float32), new


def make_steps(model, *, n: int, gen_len: int, cache_dtype, prefill_dtype, compute_dtype,
               attention: str, scan: bool, weights_first: bool = False, shared: int = 0):
  """(prefill_fn, decode_fn) for the generation loop.

  prefill_fn(tokens_bp, positions_bp, mask_bp) -> (logits [B * n, V], state);
  decode_fn(tokens_r, positions_r, state, step) -> (logits [R, V], state). `state` is the
  cache pytree (rows sharded like the batch under a mesh: `constrain_cache`). `attention`: see
  `_attend_step`; `scan`: the blocks as one lax.scan rather than unrolled; `weights_first`:
  the decode step's projections and LM head as W x^T over a copy of the kernels transposed once
  per call (`layers.weights_first`; unrolled blocks only); `shared`: the prompts' common prefix
  length (`prefill`). The generic path ignores all four (it runs the prefix in every row).
  """
  if fast_path_ok(model):
    cache_dt = jnp.dtype(cache_dtype) if cache_dtype is not None else model._cdt(None)

    def prefill_fn(tokens_bp, positions_bp, mask_bp):
      logits_bv, pc = prefill(model, tokens_bp, positions_bp, mask_bp, prefill_dtype, cache_dt,
                              scan, shared)
      rows = tokens_bp.shape[0] * n
      gc = init_gen_cache(model.config, rows, gen_len, cache_dt, attention, scan)
      # Rows are sharded like the batch; the common prefix (one copy) is replicated.
      state = (constrain_cache(pc, scan), constrain_cache(gc, scan), mask_bp[:, shared:])
      return jnp.repeat(logits_bv, n, axis=0), state

    decode_model, switch = model, contextlib.nullcontext
    if weights_first and not scan:
      graphdef, params = nnx.split(model)
      decode_model = nnx.merge(graphdef, layers.kernels_out_in(params))
      switch = layers.weights_first

    def decode_fn(tokens_r, positions_r, state, step):
      pc, gc, mask_bp = state
      with switch():
        logits_rv, gc = decode_step(decode_model, tokens_r, positions_r, pc, gc, step, mask_bp,
                                    n, compute_dtype, attention, scan)
      return logits_rv, (pc, gc, mask_bp)
    return prefill_fn, decode_fn

  def prefill_generic(tokens_bp, positions_bp, mask_bp):
    b, p = tokens_bp.shape
    kv_valid_bs = jnp.concatenate([mask_bp, jnp.ones((b, gen_len), bool)], axis=-1)
    cache = model.init_cache(b, p + gen_len, dtype=cache_dtype)
    logits, cache = model.decode(tokens_bp, positions_bp, cache, 0, kv_valid_bs,
                                 compute_dtype=prefill_dtype)
    cache = sharding.constrain_rows(jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), cache))
    kv_valid_rs = sharding.constrain_rows(jnp.repeat(kv_valid_bs, n, axis=0))
    state = (cache, kv_valid_rs, jnp.int32(p))
    return jnp.repeat(logits[:, -1].astype(jnp.float32), n, axis=0), state

  def decode_generic(tokens_r, positions_r, state, step):
    cache, kv_valid_rs, p = state
    logits, cache = model.decode(tokens_r[:, None], positions_r[:, None], cache, p + step,
                                 kv_valid_rs, compute_dtype=compute_dtype)
    return logits[:, 0].astype(jnp.float32), (cache, kv_valid_rs, p)
  return prefill_generic, decode_generic
