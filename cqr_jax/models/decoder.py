"""The policy model: one Flax NNX decoder for Qwen2/Qwen2.5 and Llama-3.x/SmolLM2 (method.md 1.1).

Usage (all arrays int32 unless said; mask 1 = real token; positions count from 0 at the first
real token, so a left-padded prompt's positions are 0, 0, ..., 0, 1, 2, ...):

    from flax import nnx
    from cqr_jax.models.config import ModelConfig
    from cqr_jax.models.decoder import Decoder

    cfg = ModelConfig.smollm2_135m()                     # or ModelConfig.from_hf_config(folder)
    model = Decoder(cfg, rngs=nnx.Rngs(0))               # sharded: cqr_jax.sharding.create_model
    logits_btv = model(tokens_bt, positions_bt, mask_bt)            # float32 [B, T, V]
    logp_bt = model.token_logprobs(tokens_bt, positions_bt, mask_bt, targets_bt,
                                   temperature=1.0)      # chunked over T, no [B, T, V] in memory
    logp_bt, ent_bt = model.token_logprobs(..., with_entropy=True)
    # n completions per left-padded prompt (row r continues prompt r // n), each prompt run once:
    logp_bc = model.completion_logprobs(prompt_bp, prompt_mask_bp, completion_bc,
                                        completion_mask_bc, n, temperature=0.7)   # [P*n, Lc]

    # Generation with the functional KV cache (pytree in -> pytree out; donate it under jit):
    cache = model.init_cache(batch, max_len)             # [{"k": [B, S, KVH, Dh], "v": ...}] * L
    kv_valid_bs = zeros([B, S], bool).at[:, :P].set(prompt_mask_bp)   # caller marks real slots
    logits_bpv, cache = model.decode(prompt_bp, positions_bp, cache, 0, kv_valid_bs)   # prefill
    kv_valid_bs = kv_valid_bs.at[:, P].set(True)         # the slot the next token goes to
    logits_b1v, cache = model.decode(next_b1, pos_b1, cache, P, kv_valid_bs)           # one step

    # Under jit: graphdef, state = nnx.split(model); inside the jitted fn
    #   nnx.merge(graphdef, state).decode(...); pass `cache` with donate_argnums.

Query t of a `decode` call sees slot s iff kv_valid_bs[b, s] and s <= cache_index + t; the call
writes its own K/V before attending, so kv_valid_bs must already mark the new slots as valid.
`compute_dtype=` on any method overrides the config's (e.g. float32 for skinny decode matmuls on
CPU while training uses bfloat16).

Traced under a mesh (`cqr_jax.sharding.activation_mesh` or `jax.set_mesh`), the residual stream
between blocks and the LM head's input and logits keep their batch rows on ("data", "fsdp")
(`sharding.constrain_rows`); without one that is a no-op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from cqr_jax import sharding
from cqr_jax.models.attention import Attention
from cqr_jax.models.config import ModelConfig
from cqr_jax.models.layers import Embed, RMSNorm, dtype_of, init_normal, mm_rows
from cqr_jax.models.mlp import MLP
from cqr_jax.models.rope import inv_frequencies, rope_cos_sin

Cache = list  # list over layers of {"k": [B, S, KVH, Dh], "v": [B, S, KVH, Dh]}


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

  def __init__(self, cfg: ModelConfig, kernels: dict[str, jax.Array]):
    dtype = dtype_of(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
    self.attn = Attention(cfg, kernels)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
    self.mlp = MLP(kernels)

  def __call__(self, x_btd, cos_btd, sin_btd, mask_btt, compute_dtype, common=None):
    x_btd = x_btd + self.attn(self.attn_norm(x_btd), cos_btd, sin_btd, mask_btt, compute_dtype,
                              common)
    return x_btd + self.mlp(self.mlp_norm(x_btd), compute_dtype)

  def shared_prefix(self, x, rope_p, rope_c, masks, n, compute_dtype, common=None):
    """`x` = (prompts [P, Lp, D], completions [P*n, Lc, D]); `masks` = (mask_bpp, prompt_mask_bp,
    own_mask_bcs); `common`: this layer's prefix keys/values: see Attention.shared_prefix."""
    xp_bpd, xc_bcd = x
    ap_bpd, ac_bcd = self.attn.shared_prefix(self.attn_norm(xp_bpd), self.attn_norm(xc_bcd), rope_p,
                                             rope_c, *masks, n, compute_dtype, common)
    xp_bpd, xc_bcd = xp_bpd + ap_bpd, xc_bcd + ac_bcd
    return (xp_bpd + self.mlp(self.mlp_norm(xp_bpd), compute_dtype),
            xc_bcd + self.mlp(self.mlp_norm(xc_bcd), compute_dtype))

  def packed_rows(self, x_rcd, cos, sin, mask_rcs, streams, head, compute_dtype, common=None):
    """The block over the rows of packed streams [R, Lc, D] (Attention.packed_rows)."""
    x_rcd = x_rcd + self.attn.packed_rows(self.attn_norm(x_rcd), cos, sin, mask_rcs, streams,
                                          head, compute_dtype, common)
    return x_rcd + self.mlp(self.mlp_norm(x_rcd), compute_dtype)

  def prefix_kv(self, x_1sd, cos, sin, compute_dtype):
    """The block over one causal sequence [1, S, D] -> (x, its (k, v) [KVH, S, Dh])."""
    a_1sd, kv = self.attn.prefix_kv(self.attn_norm(x_1sd), cos, sin, compute_dtype)
    x_1sd = x_1sd + a_1sd
    return x_1sd + self.mlp(self.mlp_norm(x_1sd), compute_dtype), kv

  def decode(self, x_btd, cos_btd, sin_btd, layer_cache, cache_index, mask_bts, compute_dtype):
    a_btd, layer_cache = self.attn.decode(self.attn_norm(x_btd), cos_btd, sin_btd, layer_cache,
                                          cache_index, mask_bts, compute_dtype)
    x_btd = x_btd + a_btd
    return x_btd + self.mlp(self.mlp_norm(x_btd), compute_dtype), layer_cache


def block_kernel_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  """[in, out] shape of each matrix in a block."""
  d, f, qd, kvd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim,
                   cfg.num_kv_heads * cfg.head_dim)
  return {"q_proj": (d, qd), "k_proj": (d, kvd), "v_proj": (d, kvd), "o_proj": (qd, d),
          "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def _remat_policy(name: str):
  return None if name == "full" else getattr(jax.checkpoint_policies, name)


class Decoder(nnx.Module):
  """Token embedding -> L blocks -> final RMSNorm -> LM head (tied to the embedding or not).

  Parameter paths (see hf_names.py for the HF map): embed.embedding [V, D];
  layers.{i}.{attn_norm,mlp_norm}.scale [D]; layers.{i}.attn.{q,k,v,o}_proj.kernel [in, out]
  (+ q/k/v .bias for Qwen2); layers.{i}.mlp.{gate,up,down}_proj.kernel [in, out];
  final_norm.scale [D]; lm_head.embedding [V, D] when untied.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = dtype_of(config.param_dtype)
    n = config.num_layers
    k_embed, k_head, k_layers = jax.random.split(rngs.params(), 3)
    vd = (config.vocab_size, config.hidden_size)
    # One RNG draw per matrix kind, stacked over layers, then sliced: compiles in O(1) ops
    # (not O(layers)) and, with partitionable threefry, each device draws only its shards.
    shapes = block_kernel_shapes(config)
    stacked = {name: init_normal(k, (n, *shape), dtype)
               for (name, shape), k in zip(shapes.items(), jax.random.split(k_layers, len(shapes)))}
    self.embed = Embed(init_normal(k_embed, vd, dtype))
    self.layers = nnx.List([Block(config, {name: w[i] for name, w in stacked.items()})
                            for i in range(n)])
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.lm_head = None if config.tie_word_embeddings else Embed(init_normal(k_head, vd, dtype))

  # ------------------------------------------------------------------ helpers
  def _cdt(self, compute_dtype):
    return dtype_of(compute_dtype or self.config.compute_dtype)

  def _rope(self, positions_bt):
    cfg = self.config
    return rope_cos_sin(positions_bt, inv_frequencies(cfg.head_dim, cfg.rope_theta,
                                                      cfg.rope_scaling))

  def lm_head_vd(self) -> jax.Array:
    """The output projection [V, D] (the embedding table when tied)."""
    head = self.embed if self.lm_head is None else self.lm_head
    return head.embedding[...]

  # ------------------------------------------------------------------ full-sequence forward
  def hidden(self, tokens_bt, positions_bt, mask_bt, *, compute_dtype=None,
             frozen_layers: int = 0, common=None) -> jax.Array:
    """Final-normed hidden states [B, T, D] (float32); causal + padding attention.

    `frozen_layers`: the bottom blocks whose parameters (and the embeddings) the caller holds
    fixed with stop_gradient (cqr_jax.partial_training); they run as their own scan without
    remat, so differentiating the output touches the blocks above them only. `common`:
    `prefix_kv` of S tokens before every row, which all positions also attend to (the caller's
    positions then start at S)."""
    cdt = self._cdt(compute_dtype)
    t = tokens_bt.shape[1]
    causal_tt = jnp.tril(jnp.ones((t, t), bool))
    mask_btt = causal_tt[None] & (mask_bt[:, None, :] > 0)
    cos, sin = self._rope(positions_bt)
    x_btd = self._run_blocks(lambda layer, x, kv: layer(x, cos, sin, mask_btt, cdt, kv),
                             self.embed(tokens_bt), frozen_layers, common)
    return self.final_norm(x_btd)

  def _run_blocks(self, apply, x, frozen_layers: int = 0, xs=None):
    """x -> apply(block, x, xs_l) through the blocks: one lax.scan (config.scan_layers) or
    unrolled; the config's remat on each trainable block, none on the bottom `frozen_layers`.
    `xs`: per-layer inputs stacked on a leading [L] axis (xs_l = layer l's slice), or None."""
    remat = self.config.remat
    rows = sharding.constrain_rows  # the residual stream between blocks: batch rows sharded
    block = lambda layer, x, xs_l: rows(apply(layer, x, xs_l))  # noqa: E731
    x = rows(x)

    def take(lo, hi):
      return None if xs is None else jax.tree.map(lambda a: a[lo:hi], xs)

    if self.config.scan_layers:
      body = lambda layer, x, xs_l: (block(layer, x, xs_l), None)  # noqa: E731
      if frozen_layers:
        x, _ = scan_blocks(self.layers[:frozen_layers], body, x, take(0, frozen_layers))
      x, _ = scan_blocks(self.layers[frozen_layers:], body, x, take(frozen_layers, None),
                         remat=remat)
      return x
    for i, layer in enumerate(self.layers):
      xs_l = None if xs is None else jax.tree.map(lambda a: a[i], xs)  # noqa: B023
      if remat == "none" or i < frozen_layers:
        x = block(layer, x, xs_l)
      else:
        x = _remat_layer(layer, block, x, xs_l, remat)
    return x

  def shared_prefix_hidden(self, prompt_bp, prompt_mask_bp, completion_bc, completion_mask_bc,
                           n: int, *, compute_dtype=None, frozen_layers: int = 0):
    """Final-normed hidden states of P left-padded prompts [P, Lp, D] and of their n completions
    each [P*n, Lc, D] (row r continues prompt r // n), the prompts run once rather than n times.

    Equals `hidden` on the rows prompt ++ completion (positions continue from the prompt's real
    length; completion keys past a row's mask are hidden). `frozen_layers`: as in `hidden`."""
    lc = completion_bc.shape[1]
    offset_bc = jnp.broadcast_to(jnp.arange(lc, dtype=jnp.int32)[None], completion_bc.shape)
    own_bcc = jnp.tril(jnp.ones((lc, lc), bool))[None] & (completion_mask_bc[:, None, :] > 0)
    return self._shared_prefix_run(prompt_bp, prompt_mask_bp, completion_bc, offset_bc, own_bcc,
                                   n, compute_dtype, frozen_layers)

  def prefix_kv(self, prefix_s, *, compute_dtype=None):
    """The keys and values of a prefix that every prompt of a `packed_completion_logprobs` call,
    or every row of a `hidden` call, starts with (a template's instructions): (k, v), each
    [L, KVH, S, Dh] float32, of the tokens
    prefix_s [S] at positions 0..S-1. No remat: S tokens once."""
    cdt = self._cdt(compute_dtype)
    s = prefix_s.shape[0]
    cos, sin = self._rope(jnp.arange(s, dtype=jnp.int32)[None])
    x = self.embed(prefix_s[None])
    if self.config.scan_layers:
      _, kv = scan_blocks(self.layers, lambda layer, x, _: layer.prefix_kv(x, cos, sin, cdt), x)
      return kv
    kvs = []
    for layer in self.layers:
      x, kv = layer.prefix_kv(x, cos, sin, cdt)
      kvs.append(kv)
    return tuple(jnp.stack([kv[i] for kv in kvs]) for i in range(2))

  def _shared_prefix_run(self, prompt_bp, prompt_mask_bp, completion_bc, offset_bc, own_mask_bcs,
                         n, compute_dtype, frozen_layers, common=None):
    """The blocks over prompts [P, Lp] and completion rows [P*n, Lc] whose token t sits at
    position (prompt length + offset_bc[r, t]) and sees the row keys own_mask_bcs allows
    (Attention.shared_prefix) -> final-normed (hp [P, Lp, D], hc [P*n, Lc, D]). `common`:
    `prefix_kv` of S tokens before every prompt (positions then start at S)."""
    cdt = self._cdt(compute_dtype)
    lp = prompt_bp.shape[1]
    s = 0 if common is None else common[0].shape[2]
    prompt_mask_bp = prompt_mask_bp > 0
    pos_bp = s + jnp.maximum(jnp.cumsum(prompt_mask_bp.astype(jnp.int32), axis=-1) - 1, 0)
    start_b = s + jnp.repeat(jnp.sum(prompt_mask_bp, axis=-1, dtype=jnp.int32), n)
    pos_bc = start_b[:, None] + offset_bc
    mask_bpp = jnp.tril(jnp.ones((lp, lp), bool))[None] & prompt_mask_bp[:, None, :]
    rope_p, rope_c = self._rope(pos_bp), self._rope(pos_bc)
    masks = (mask_bpp, prompt_mask_bp, own_mask_bcs)
    x = (self.embed(prompt_bp), self.embed(completion_bc))
    xp_bpd, xc_bcd = self._run_blocks(
        lambda layer, x, kv: layer.shared_prefix(x, rope_p, rope_c, masks, n, cdt, kv), x,
        frozen_layers, common)
    return self.final_norm(xp_bpd), self.final_norm(xc_bcd)

  def logits(self, h_btd, *, compute_dtype=None) -> jax.Array:
    """LM head on hidden states: [B, T, D] -> float32 [B, T, V] (rows sharded as the batch)."""
    rows = sharding.constrain_rows
    return rows(mm_rows(rows(h_btd), self.lm_head_vd(), self._cdt(compute_dtype), w_out_in=True))

  def __call__(self, tokens_bt, positions_bt, mask_bt, *, compute_dtype=None) -> jax.Array:
    """Float32 logits [B, T, V] for a left- or right-padded batch."""
    h_btd = self.hidden(tokens_bt, positions_bt, mask_bt, compute_dtype=compute_dtype)
    return self.logits(h_btd, compute_dtype=compute_dtype)

  def token_logprobs(self, tokens_bt, positions_bt, mask_bt, targets_bt, *,
                     temperature: float = 1.0, chunk_size: int = 128,
                     with_entropy: bool = False, compute_dtype=None, last: int | None = None,
                     frozen_layers: int = 0, common=None):
    """log_softmax(logits / temperature)[targets] per token, [B, T] float32 (and the entropy of
    that distribution if `with_entropy`). The LM head runs over `chunk_size` positions at a time
    inside a rematerialised lax.scan, so [B, T, V] logits never exist (forward or backward).
    Values at padding positions are meaningless: multiply by the mask. With `last`, only the last
    that many positions go through the LM head (e.g. a rollout's completion); the others are 0.
    `frozen_layers`, `common`: as in `hidden`."""
    h_btd = self.hidden(tokens_bt, positions_bt, mask_bt, compute_dtype=compute_dtype,
                        frozen_layers=frozen_layers, common=common)
    t = tokens_bt.shape[1]
    last = t if last is None else min(last, t)
    out = chunked_logprobs(h_btd[:, t - last:], self.lm_head_vd(), targets_bt[:, t - last:],
                           temperature=temperature, chunk_size=chunk_size,
                           with_entropy=with_entropy, compute_dtype=self._cdt(compute_dtype),
                           remat=self.config.remat)
    if last == t:
      return out
    pad = lambda x: jnp.pad(x, ((0, 0), (t - last, 0)))  # noqa: E731
    return tuple(map(pad, out)) if with_entropy else pad(out)

  def completion_logprobs(self, prompt_bp, prompt_mask_bp, completion_bc, completion_mask_bc,
                          n: int, *, temperature: float = 1.0, chunk_size: int = 128,
                          with_entropy: bool = False, compute_dtype=None,
                          frozen_layers: int = 0):
    """log_softmax(logits / temperature) of every completion token given its prompt and the
    completion before it, [P*n, Lc] float32 (and entropies): `shared_prefix_hidden`, then the LM
    head on the completion positions only. Prompts must be left-padded (the sampler's layout):
    their last column is the state that predicts a completion's first token."""
    hp_bpd, hc_bcd = self.shared_prefix_hidden(prompt_bp, prompt_mask_bp, completion_bc,
                                               completion_mask_bc, n, compute_dtype=compute_dtype,
                                               frozen_layers=frozen_layers)
    h_bcd = jnp.concatenate([jnp.repeat(hp_bpd[:, -1:], n, axis=0), hc_bcd[:, :-1]], axis=1)
    return chunked_logprobs(h_bcd, self.lm_head_vd(), completion_bc, temperature=temperature,
                            chunk_size=chunk_size, with_entropy=with_entropy,
                            compute_dtype=self._cdt(compute_dtype), remat=self.config.remat)

  def packed_completion_logprobs(self, packed_bkc, segment_bkc, position_bkc, source_bkc,
                                 unpack_bmc, *, prompt_width: int, temperature: float = 1.0,
                                 chunk_size: int = 128, with_entropy: bool = False,
                                 compute_dtype=None, frozen_layers: int = 0, common=None):
    """`completion_logprobs` of P prompts' m completions each, each prompt's real tokens then its
    completions packed end to end in a stream of k rows of Lc slots (train/rollout_batch.
    pack_groups): neither the prompts' left padding nor the completions' right padding goes
    through the model, only the stream's tail.

    packed_bkc [P, k, Lc]: the tokens; segment_bkc: the completion (0..m-1) a slot holds, m for
    the prompt, -1 if empty; position_bkc: the token's position from the prompt's first token;
    source_bkc: the slot (0..k*Lc-1) whose output predicts the slot's token; unpack_bmc
    [P, m, Lc]: the slot of completion j's token t (any slot past its end: masked by the
    caller). A slot sees the prompt's slots and its own completion's, causally. The prompt lies
    in the first `prompt_width` slots (at most: its left-padded width) and a completion (at most
    Lc tokens) in at most two consecutive rows, so a row attends to those first slots, the
    previous row and itself (Attention.packed_rows), not to the whole stream. `common`:
    `prefix_kv` of a prefix that comes before every prompt (positions then start at its length
    S).
    Returns log-probs [P*m, Lc] (and entropies), laid out as `completion_logprobs`'."""
    p, k, lc = packed_bkc.shape
    m = unpack_bmc.shape[1]
    w = min(prompt_width, k * lc)
    s = 0 if common is None else common[0].shape[2]
    seg_q = segment_bkc[..., None]  # [P, k, Lc, 1]
    seg_prev = jnp.pad(segment_bkc, ((0, 0), (1, 0), (0, 0)), constant_values=-1)[:, :k]
    near = jnp.concatenate([seg_prev, segment_bkc], axis=-1)[:, :, None, :]  # [P, k, 1, 2 Lc]
    causal_cs = jnp.arange(2 * lc)[None, :] <= lc + jnp.arange(lc)[:, None]
    near_ok = (near >= 0) & ((near == seg_q) | (near == m)) & causal_cs
    # The first w slots' prompt keys, less those the previous row and the row itself hold.
    head = segment_bkc.reshape(p, 1, 1, k * lc)[..., :w]
    head_row = jnp.arange(w) // lc
    head_ok = (head == m) & (head_row < jnp.arange(k)[:, None, None] - 1)
    mask = jnp.concatenate([jnp.broadcast_to(head_ok, (p, k, lc, w)),
                            jnp.broadcast_to(near_ok, (p, k, lc, 2 * lc))], axis=-1)
    mask = (mask & (seg_q >= 0)).reshape(p * k, lc, w + 2 * lc)
    cdt = self._cdt(compute_dtype)
    cos, sin = self._rope(s + position_bkc.reshape(p * k, lc))
    x = self._run_blocks(
        lambda layer, x, kv: layer.packed_rows(x, cos, sin, mask, p, w, cdt, kv),
        self.embed(packed_bkc.reshape(p * k, lc)), frozen_layers, common)
    h_bsd = self.final_norm(x).reshape(p, k * lc, -1)
    h_bsd = jnp.take_along_axis(h_bsd, source_bkc.reshape(p, k * lc, 1), axis=1)
    out = chunked_logprobs(h_bsd, self.lm_head_vd(), packed_bkc.reshape(p, k * lc),
                           temperature=temperature, chunk_size=chunk_size,
                           with_entropy=with_entropy, compute_dtype=cdt,
                           remat=self.config.remat)
    idx = unpack_bmc.reshape(p, m * lc)
    unpack = lambda x_bs: jnp.take_along_axis(x_bs, idx, axis=1).reshape(p * m, lc)  # noqa: E731
    return tuple(map(unpack, out)) if with_entropy else unpack(out)

  # ------------------------------------------------------------------ KV-cache decoding
  def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
    """Zeroed cache: per layer {"k", "v"} of [B, S, KVH, Dh] in `dtype` (default: compute dtype)."""
    cfg = self.config
    dt = dtype_of(dtype) if isinstance(dtype, str) else (dtype or dtype_of(cfg.compute_dtype))
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return [{"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in range(cfg.num_layers)]

  def decode(self, tokens_bt, positions_bt, cache: Cache, cache_index, kv_valid_bs, *,
             compute_dtype=None, last_only: bool = False):
    """Runs T new tokens against the cache: writes their K/V at [cache_index, cache_index + T)
    and lets query t see slot s iff kv_valid_bs[b, s] and s <= cache_index + t.
    Returns (float32 logits [B, T, V], updated cache); with `last_only` the LM head runs on the
    last position alone and logits are [B, 1, V] (a left-padded prefill needs only those)."""
    cdt = self._cdt(compute_dtype)
    t, s = tokens_bt.shape[1], cache[0]["k"].shape[1]
    cache_index = jnp.asarray(cache_index, jnp.int32)
    q_pos_t = cache_index + jnp.arange(t, dtype=jnp.int32)
    causal_ts = jnp.arange(s, dtype=jnp.int32)[None, :] <= q_pos_t[:, None]
    mask_bts = causal_ts[None] & kv_valid_bs[:, None, :].astype(bool)
    cos, sin = self._rope(positions_bt)
    x_btd = sharding.constrain_rows(self.embed(tokens_bt))
    new_cache = []
    for layer, layer_cache in zip(self.layers, cache):
      x_btd, layer_cache = layer.decode(x_btd, cos, sin, layer_cache, cache_index, mask_bts, cdt)
      x_btd = sharding.constrain_rows(x_btd)
      new_cache.append(layer_cache)
    if last_only:
      x_btd = x_btd[:, -1:]
    return self.logits(self.final_norm(x_btd), compute_dtype=compute_dtype), new_cache


def stack_blocks(layers) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef of one block, the blocks' states stacked on a new leading [L] axis)."""
  states = [nnx.state(layer) for layer in layers]
  return nnx.graphdef(layers[0]), jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def scan_blocks(layers, body, carry, xs=None, *, remat: str = "none"):
  """Runs `body(block, carry, xs_l) -> (carry, ys_l)` over the blocks as one lax.scan.

  The blocks' parameters are stacked at trace time (`stack_blocks`), so the program holds one
  block whatever the depth; `xs` (leading axis L) are per-layer inputs such as a KV cache; with
  `remat` other than "none" the body is a jax.checkpoint (policy by name), as in the unrolled path.
  Returns (carry, ys stacked over L).
  """
  graphdef, stacked = stack_blocks(layers)

  def step(c, inputs):
    state, x = inputs
    return body(nnx.merge(graphdef, state), c, x)

  if remat != "none":
    step = jax.checkpoint(step, policy=_remat_policy(remat))
  return jax.lax.scan(step, carry, (stacked, xs))


def _remat_layer(layer: Block, apply, x, xs_l, remat: str):
  """apply(block, x, xs_l) under jax.checkpoint (policy by name), via a pure function of its
  state."""
  graphdef, state = nnx.split(layer)

  @functools.partial(jax.checkpoint, policy=_remat_policy(remat))
  def run(state, x, xs_l):
    return apply(nnx.merge(graphdef, state), x, xs_l)

  return run(state, x, xs_l)


def chunked_logprobs(h_btd, w_vd, targets_bt, *, temperature=1.0, chunk_size=128,
                     with_entropy=False, compute_dtype=jnp.float32, remat: str = "full"):
  """Per-token target log-probs (and entropies) from hidden states, chunked over T.

  `remat` (the model's `ModelConfig.remat`): "full" recomputes each chunk's logits in the
  backward pass, so no [B, chunk, V] block outlives its chunk; a policy name saves what it
  allows (the logits are a dot without batch dims); "none" keeps every chunk's logits and
  probabilities, B x T x V floats (cheap for a small model), and the LM head's forward then runs
  once instead of twice in an update (bench/results/grpo_step.md).
  Under a mesh, the hidden states and each chunk's logits keep their rows sharded as the batch
  (`sharding.constrain_rows`)."""
  rows = sharding.constrain_rows
  b, t, d = h_btd.shape
  c = max(1, min(chunk_size, t))
  n = -(-t // c)
  pad = n * c - t
  h_nbcd = jnp.pad(rows(h_btd), ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, d)
  h_nbcd = rows(h_nbcd.transpose(1, 0, 2, 3), axis=1)
  tg_nbc = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(b, n, c).transpose(1, 0, 2)
  tg_nbc = rows(tg_nbc, axis=1)
  inv_temp = 1.0 / temperature

  def chunk(w_vd, h_bcd, tg_bc):
    z_bcv = rows(mm_rows(rows(h_bcd), w_vd, compute_dtype, w_out_in=True)) * inv_temp
    lse_bc = jax.nn.logsumexp(z_bcv, axis=-1)
    logp_bc = jnp.take_along_axis(z_bcv, tg_bc[..., None].astype(jnp.int32), -1)[..., 0] - lse_bc
    if not with_entropy:
      return logp_bc, jnp.zeros_like(logp_bc)
    p_bcv = jnp.exp(z_bcv - lse_bc[..., None])
    return logp_bc, lse_bc - jnp.sum(p_bcv * z_bcv, axis=-1)

  if remat != "none":
    chunk = jax.checkpoint(chunk, policy=_remat_policy(remat))

  def body(carry, xs):
    return carry, chunk(w_vd, *xs)

  _, (logp_nbc, ent_nbc) = jax.lax.scan(body, None, (h_nbcd, tg_nbc))
  logp_bt = logp_nbc.transpose(1, 0, 2).reshape(b, n * c)[:, :t]
  if not with_entropy:
    return logp_bt
  return logp_bt, ent_nbc.transpose(1, 0, 2).reshape(b, n * c)[:, :t]
