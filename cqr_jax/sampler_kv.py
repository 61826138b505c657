"""The sampler's KV-cache forward passes: prefill of B prompts, then decode steps for B * n rows.

The cache is split in two, per layer:
- prompt part {"k", "v"}: [B, KVH, P, Dh], written once by the prefill and shared by the n
  samples of each prompt (never repeated n times: n-fold less memory and fewer bytes read per
  step for the prompt slots, which dominate in GRPO: 1,536-token prompts, n = 8-16); when the
  prompts share a prefix (`prefill` `shared`), that prefix is held once for all rows in
  "shared_k", "shared_v" [KVH, S, Dh] and "k", "v" hold each prompt's remaining columns;
- generation part {"k", "v"}: [B * n, KVH, G, Dh], one slot written per step, in place; with
  the CPU's "reduce" products "k" is stored [B * n, KVH, Dh, G] (`cpu_decode.Reduce`).
Rows are prompt-major (row i * n + j = sample j of prompt i). Head-major layouts make both
attention matmuls plain batched matmuls over (B, KVH); a [B, S, KVH, Dh] cache made XLA:CPU
transpose the whole cache every layer and step (slower attention; bench/results/sampler.md).
A decode step's softmax runs jointly over the prompt and generation slots: the same attention
as one concatenated cache.

Projections, norms, RoPE, MLP and LM head are the Decoder's own modules. The strategies
(products, cache dtype, scanned blocks, weights first) come from the call's `sampler.DecodePlan`.

Under a mesh (`jax.set_mesh`, as `Sampler` calls the program), the residual stream between blocks
and the caches keep their rows on ("data", "fsdp") (`cqr_jax.sharding.constrain_rows`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cqr_jax import cpu_decode, sharding
from cqr_jax.models.attention import NEG_INF, causal_rows, heads_major, joint_softmax
from cqr_jax.models.layers import mm


class Matmul:
  """The decode step's attention products as einsums (matrix units: TPU, GPU); generation keys
  stored [R, KVH, G, Dh]. The CPU's fused multiply-sums are `cpu_decode.Reduce`."""
  k_slots_last = False

  @staticmethod
  def gen_scores(q_rkgd, gen_k_rksd, dt):
    return mm(q_rkgd, gen_k_rksd, dt, "rkgd,rksd->rkgs")

  @staticmethod
  def prompt_values(p_bnkgp, v_bkpd, dt):
    return mm(p_bnkgp, v_bkpd, dt, "bnkgp,bkpd->bnkgd")

  @staticmethod
  def gen_values(p_rkgs, v_rksd, dt):
    return mm(p_rkgs, v_rksd, dt, "rkgs,rksd->rkgd")


def products(attention: str):
  """The step's attention products for `DecodePolicy.attention`."""
  return cpu_decode.Reduce if attention == "reduce" else Matmul


def _attend_step(q_r1nd, prompt, gen, prompt_mask_bp, step, n, dt, ops):
  """One query per row over its prompt's slots and its own generated slots [0, step]:
  [R, 1, H * Dh] f32, one softmax over all parts (`joint_softmax`). Matmuls in `dt` (the cache
  dtype: no per-step cast of the cache); `ops`: the products (`products`)."""
  r, _, h, dh = q_r1nd.shape
  b, kvh, _, _ = prompt["k"].shape
  g = h // kvh
  q_rkgd = q_r1nd.reshape(r, kvh, g, dh) * (dh ** -0.5)
  s_bnkgp = mm(q_rkgd.reshape(b, n, kvh, g, dh), prompt["k"], dt, "bnkgd,bkpd->bnkgp")
  s_bnkgp = jnp.where(prompt_mask_bp[:, None, None, None, :], s_bnkgp, NEG_INF)
  s_rkgs = ops.gen_scores(q_rkgd, gen["k"], dt)
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
  o_bnkgd = ops.prompt_values(p_bnkgp, prompt["v"], dt)
  o_rkgd = ops.gen_values(p_bnkgs.reshape(r, kvh, g, -1), gen["v"], dt)
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
  prompts' common prefix: a template's instructions; `Sampler` lays prompts out so). The model
  then runs once over that prefix (batch 1) and once over the B rows' remaining columns, which
  attend to the prefix's keys without repeating them: (B - 1) * shared fewer tokens through the
  model. The prompt cache then holds the rows' own P - shared columns in "k", "v" and the
  prefix once in "shared_k", "shared_v" [KVH, shared, Dh] ([L, ...] with `scan`), which decode
  steps read once for all rows (`_attend_step`)."""
  s = shared
  run = functools.partial(model.forward, compute_dtype=compute_dtype, scan=scan, remat="none")
  kv_prefix = None
  if s:  # [(L,) 1, KVH, S, Dh] -> [(L,) KVH, S, Dh]
    _, kv_prefix = run(tokens_bp[:1, :s], positions_bp[:1, :s],
                       causal_rows(jnp.ones((1, s), jnp.int32), keep_kv=True))
    kv_prefix = jax.tree.map(lambda x: x[:, 0] if scan else x[0], kv_prefix)
  h_bqd, kv = run(tokens_bp[:, s:], positions_bp[:, s:], causal_rows(mask_bp[:, s:], keep_kv=True),
                  layer_inputs=kv_prefix)

  def cache_of(kv_prefix, kv):
    k, v = kv
    cache = {"k": k.astype(cache_dtype), "v": v.astype(cache_dtype)}
    if kv_prefix is not None:
      cache["shared_k"] = kv_prefix[0].astype(cache_dtype)
      cache["shared_v"] = kv_prefix[1].astype(cache_dtype)
    return cache

  if scan:
    cache = cache_of(kv_prefix, kv)
  else:
    cache = [cache_of(kvp, kvl) for kvp, kvl in zip(kv_prefix or [None] * len(kv), kv)]
  logits_b1v = model.logits(h_bqd[:, -1:], compute_dtype=compute_dtype)
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


def init_gen_cache(cfg, rows: int, gen_len: int, dtype, ops, scan: bool):
  """Zeroed generation cache: per layer {"k", "v"} [R, KVH, G, Dh] ("k" [R, KVH, Dh, G] when
  `ops.k_slots_last`), or one dict of those stacked on a leading [L] with `scan`."""
  v_shape = (rows, cfg.num_kv_heads, gen_len, cfg.head_dim)
  k_shape = (rows, cfg.num_kv_heads, cfg.head_dim, gen_len) if ops.k_slots_last else v_shape
  if scan:
    return {"k": jnp.zeros((cfg.num_layers, *k_shape), dtype),
            "v": jnp.zeros((cfg.num_layers, *v_shape), dtype)}
  return [{"k": jnp.zeros(k_shape, dtype), "v": jnp.zeros(v_shape, dtype)}
          for _ in range(cfg.num_layers)]


def _write_slot(k_cache, v_cache, k_rk1d, v_rk1d, step, ops):
  """Writes one step's keys/values [..., R, KVH, 1, Dh] into slot `step` of the generation
  cache (leading axes, e.g. a stacked [L], are written whole)."""
  lead = (0,) * (k_cache.ndim - 4)
  if ops.k_slots_last:
    k_new, k_at = k_rk1d.swapaxes(-1, -2), lead + (0, 0, 0, step)
  else:
    k_new, k_at = k_rk1d, lead + (0, 0, step, 0)
  v_at = lead + (0, 0, step, 0)
  return (jax.lax.dynamic_update_slice(k_cache, k_new.astype(k_cache.dtype), k_at),
          jax.lax.dynamic_update_slice(v_cache, v_rk1d.astype(v_cache.dtype), v_at))


def decode_step(model, tokens_r, positions_r, prompt_cache, gen_cache, step, prompt_mask_bp, n,
                compute_dtype, ops, scan):
  """Row r's token at position positions_r[r] into generation slot `step`:
  (f32 logits [R, V], updated generation cache). One `Decoder.forward` whose layout attends
  over the block's cache with the new slot written (`_attend_step`).

  With `scan` the stacked caches are read-only scan inputs: each block attends over a local
  copy of its slice with the new slot written and hands back the new K/V, and the stacked
  generation cache gets all blocks' slots in one write after the scan (writing it inside the
  scan made XLA copy the whole stacked cache once per block; `python bench/bench_decode_layers.py`).
  Unrolled, each block's cache is written in place and handed back."""
  def layout(q, k, v, caches, cdt):
    del cdt
    pc, gk, gv = caches
    k, v = heads_major(k), heads_major(v)
    lk, lv = _write_slot(gk, gv, k, v, step, ops)
    o = _attend_step(q, pc, {"k": lk, "v": lv}, prompt_mask_bp, step, n, lk.dtype, ops)
    return o, ((k, v) if scan else {"k": lk, "v": lv})

  if scan:
    inputs = (prompt_cache, gen_cache["k"], gen_cache["v"])
  else:
    inputs = [(pc, gc["k"], gc["v"]) for pc, gc in zip(prompt_cache, gen_cache)]
  h_r1d, out = model.forward(tokens_r[:, None], positions_r[:, None], layout,
                             layer_inputs=inputs, compute_dtype=compute_dtype, scan=scan,
                             remat="none")
  if scan:
    new_k, new_v = _write_slot(gen_cache["k"], gen_cache["v"], *out, step, ops)
    out = {"k": new_k, "v": new_v}
  logits_r1v = model.logits(h_r1d, compute_dtype=compute_dtype)
  return logits_r1v[:, 0].astype(jnp.float32), out


def keep_rows(state, first_state, rows_idx, order, n: int, scan: bool):
  """The cache state of the rows a compaction stage keeps: `order` [R'] indexes the current
  stage's rows, `rows_idx` [R'] the call's B * n. Each kept row gets its own copy of its prompt's
  slots, from the first stage's one copy per prompt (`first_state`)."""
  prompt_cache, _, prompt_mask_bq = first_state
  gen_cache = state[1]
  return (constrain_cache(take_rows(prompt_cache, rows_idx // n, scan), scan),
          constrain_cache(take_rows(gen_cache, order, scan), scan),
          sharding.constrain_rows(prompt_mask_bq[rows_idx // n]))


def make_steps(model, plan, *, n: int, weights_first: bool = False):
  """(prefill_fn, decode_fn) for the generation loop of a `sampler.DecodePlan`.

  prefill_fn(tokens_bp, positions_bp, mask_bp) -> (logits [B * n, V], state);
  decode_fn(tokens_r, positions_r, state, step) -> (logits [R, V], state). `state` is the
  cache pytree (rows sharded like the batch under a mesh: `constrain_cache`); `n`: rows per
  prompt in the decode state (1 once compaction gave every row its own prompt slots);
  `weights_first`: the decode step over `cpu_decode.weights_first_model(model)`.
  """
  cache_dt = jnp.dtype(plan.cache_dtype)
  ops = products(plan.attention)
  scan, shared = plan.scan, plan.shared

  def prefill_fn(tokens_bp, positions_bp, mask_bp):
    logits_bv, pc = prefill(model, tokens_bp, positions_bp, mask_bp, plan.prefill_dtype,
                            cache_dt, scan, shared)
    rows = tokens_bp.shape[0] * n
    gc = init_gen_cache(model.config, rows, plan.gen_len, cache_dt, ops, scan)
    # Rows are sharded like the batch; the common prefix (one copy) is replicated.
    state = (constrain_cache(pc, scan), constrain_cache(gc, scan), mask_bp[:, shared:])
    return jnp.repeat(logits_bv, n, axis=0), state

  decode_model = cpu_decode.weights_first_model(model) if weights_first else model

  def decode_fn(tokens_r, positions_r, state, step):
    pc, gc, mask_bp = state
    logits_rv, gc = decode_step(decode_model, tokens_r, positions_r, pc, gc, step, mask_bp,
                                n, plan.compute_dtype, ops, scan)
    return logits_rv, (pc, gc, mask_bp)
  return prefill_fn, decode_fn
