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
    # prompts and their completions packed in streams (train/rollout_batch.pack_streams):
    logp_rc = model.packed_completion_logprobs(tokens, segment, position, source, unpack,
                                               prompt_width=lp, temperature=0.7)

    # Any other pass: the one forward with a layout of who attends to what
    # (cqr_jax/models/attention.py), e.g. a prompt's keys kept for a continuation:
    h_bpd, kv = model.forward(prompt_bp, positions_bp,
                              attention.causal_rows(prompt_mask_bp, keep_kv=True))
    h_bcd, _ = model.forward(next_bc, positions_bc,
                             attention.context_rows(prompt_mask_bp, own_mask_bcc, 1),
                             layer_inputs=kv)
    # The sampler's KV-cache prefill and decode steps: cqr_jax/sampler_kv.py.

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
from cqr_jax.models import attention
from cqr_jax.models.attention import Attention
from cqr_jax.models.config import ModelConfig
from cqr_jax.models.layers import Embed, RMSNorm, dtype_of, init_normal, mm_rows
from cqr_jax.models.mlp import MLP
from cqr_jax.models.rope import inv_frequencies, rope_cos_sin


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

  def __init__(self, cfg: ModelConfig, kernels: dict[str, jax.Array]):
    dtype = dtype_of(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
    self.attn = Attention(cfg, kernels)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
    self.mlp = MLP(kernels)

  def __call__(self, x_btd, rope, layout, inputs, compute_dtype):
    """-> (x [B, T, D], what the attention layout hands back): see `Decoder.forward`."""
    a_btd, out = self.attn(self.attn_norm(x_btd), rope, layout, inputs, compute_dtype)
    x_btd = x_btd + a_btd
    return x_btd + self.mlp(self.mlp_norm(x_btd), compute_dtype), out


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
    self.head_weights_first = False  # static: see `logits`

  # ------------------------------------------------------------------ helpers
  def compute_dtype_of(self, compute_dtype=None):
    """The matmul operand dtype: `compute_dtype` ("float32" / "bfloat16") or the config's."""
    return dtype_of(compute_dtype or self.config.compute_dtype)

  def rope(self, positions_bt):
    """(cos, sin) [B, T, Dh] of token positions (the config's RoPE, scaling included)."""
    cfg = self.config
    return rope_cos_sin(positions_bt, inv_frequencies(cfg.head_dim, cfg.rope_theta,
                                                      cfg.rope_scaling))

  def lm_head_vd(self) -> jax.Array:
    """The output projection [V, D] (the embedding table when tied)."""
    head = self.embed if self.lm_head is None else self.lm_head
    return head.embedding[...]

  # ------------------------------------------------------------------ the forward pass
  def forward(self, tokens_bt, positions_bt, layout, *, layer_inputs=None, compute_dtype=None,
              frozen_layers: int = 0, scan: bool | None = None, remat: str | None = None):
    """The one forward pass of training, prefill and decode: embedding -> blocks -> final norm.

    `layout` says which keys each query sees (cqr_jax/models/attention.py: `causal_rows`,
    `rows_layout`, `context_rows`, `packed_layout`; the sampler's decode step in
    cqr_jax/sampler_kv.py); each block calls it with its slice of `layer_inputs` (a pytree
    stacked on a leading [L], e.g. a prefix's keys or a KV cache; a list of L pytrees with
    unrolled blocks also works). `frozen_layers`: the bottom blocks whose parameters the caller
    holds fixed (cqr_jax.partial_training); they run without remat. `scan` / `remat`: override
    the config's `scan_layers` / `remat` (the sampler runs unrolled on CPU, never rematted).
    Returns (final-normed hidden states [B, T, D] float32, what the blocks' layouts handed back:
    stacked on [L] when scanned, a list of L when unrolled, None if nothing)."""
    cdt = self.compute_dtype_of(compute_dtype)
    rope = self.rope(positions_bt)
    x_btd, outs = self._run_blocks(
        lambda layer, x, inputs: layer(x, rope, layout, inputs, cdt),
        self.embed(tokens_bt), frozen_layers, layer_inputs,
        self.config.scan_layers if scan is None else scan,
        self.config.remat if remat is None else remat)
    return self.final_norm(x_btd), outs

  def _run_blocks(self, apply, x, frozen_layers, xs, scan: bool, remat: str):
    """x -> apply(block, x, xs_l) -> (x, out_l) through the blocks: one lax.scan or unrolled;
    `remat` on each trainable block, none on the bottom `frozen_layers`."""
    rows = sharding.constrain_rows  # the residual stream between blocks: batch rows sharded

    def block(layer, x, xs_l):
      x, out = apply(layer, x, xs_l)
      return rows(x), out

    x = rows(x)
    if scan:
      def take(lo, hi):
        return None if xs is None else jax.tree.map(lambda a: a[lo:hi], xs)
      outs = []
      if frozen_layers:
        x, out = scan_blocks(self.layers[:frozen_layers], block, x, take(0, frozen_layers))
        outs.append(out)
      x, out = scan_blocks(self.layers[frozen_layers:], block, x, take(frozen_layers, None),
                           remat=remat)
      outs.append(out)
      if len(outs) == 1 or outs[0] is None:
        return x, outs[-1]
      return x, jax.tree.map(lambda *a: jnp.concatenate(a), *outs)
    outs = []
    for i, layer in enumerate(self.layers):
      if xs is None:
        xs_l = None
      elif isinstance(xs, list):
        xs_l = xs[i]
      else:
        xs_l = jax.tree.map(lambda a: a[i], xs)  # noqa: B023
      if remat == "none" or i < frozen_layers:
        x, out = block(layer, x, xs_l)
      else:
        x, out = _remat_layer(layer, block, x, xs_l, remat)
      outs.append(out)
    return x, None if all(o is None for o in outs) else outs

  # ------------------------------------------------------------------ named passes
  def hidden(self, tokens_bt, positions_bt, mask_bt, *, compute_dtype=None,
             frozen_layers: int = 0, common=None) -> jax.Array:
    """Final-normed hidden states [B, T, D] (float32) of right- or left-padded rows; causal +
    padding attention. `common`: `prefix_kv` of S tokens before every row, which all positions
    also attend to (the caller's positions then start at S)."""
    h_btd, _ = self.forward(tokens_bt, positions_bt, attention.causal_rows(mask_bt),
                            layer_inputs=common, compute_dtype=compute_dtype,
                            frozen_layers=frozen_layers)
    return h_btd

  def prefix_kv(self, prefix_s, *, compute_dtype=None):
    """The keys and values of a prefix that every row of a `hidden` / token_logprobs call or
    every prompt of a `packed_completion_logprobs` call starts with (a template's
    instructions): (k, v), each [L, KVH, S, Dh] float32, of the tokens prefix_s [S] at
    positions 0..S-1. No remat: S tokens once."""
    s = prefix_s.shape[0]
    _, kv = self.forward(prefix_s[None], jnp.arange(s, dtype=jnp.int32)[None],
                         attention.causal_rows(jnp.ones((1, s), jnp.int32), keep_kv=True),
                         compute_dtype=compute_dtype, remat="none")
    if isinstance(kv, list):
      kv = jax.tree.map(lambda *a: jnp.stack(a), *kv)
    return tuple(x[:, 0] for x in kv)  # [L, 1, KVH, S, Dh] -> [L, KVH, S, Dh]

  def logits(self, h_btd, *, compute_dtype=None) -> jax.Array:
    """LM head on hidden states: [B, T, D] -> float32 [B, T, V] (rows sharded as the batch).
    `head_weights_first` (static, set on a decode-time copy by
    `cqr_jax.cpu_decode.weights_first_model`): the product as W h^T (`layers.mm_rows`)."""
    rows = sharding.constrain_rows
    return rows(mm_rows(rows(h_btd), self.lm_head_vd(), self.compute_dtype_of(compute_dtype),
                        w_out_in=True, weights_first=self.head_weights_first))

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
                           with_entropy=with_entropy,
                           compute_dtype=self.compute_dtype_of(compute_dtype),
                           remat=self.config.remat)
    if last == t:
      return out
    pad = lambda x: jnp.pad(x, ((0, 0), (t - last, 0)))  # noqa: E731
    return tuple(map(pad, out)) if with_entropy else pad(out)

  def packed_completion_logprobs(self, packed_bkc, segment_bkc, position_bkc, source_bkc,
                                 unpack_bmc, *, prompt_width: int, temperature: float = 1.0,
                                 chunk_size: int = 128, with_entropy: bool = False,
                                 compute_dtype=None, frozen_layers: int = 0, common=None):
    """`completion_logprobs` of P prompts' m completions each, each prompt's real tokens then its
    completions packed end to end in a stream of k rows of Lc slots (train/rollout_batch.
    pack_streams): neither the prompts' left padding nor the completions' right padding goes
    through the model, only the stream's tail.

    packed_bkc [P, k, Lc]: the tokens; segment_bkc: the completion (0..m-1) a slot holds, m for
    the prompt, -1 if empty; position_bkc: the token's position from the prompt's first token;
    source_bkc: the slot (0..k*Lc-1) whose output predicts the slot's token; unpack_bmc
    [P, m, Lc]: the slot of completion j's token t (any slot past its end: masked by the
    caller). A slot sees the prompt's slots and its own completion's, causally. The prompt lies
    in the first `prompt_width` slots (at most: its left-padded width) and a completion (at most
    Lc tokens) in at most two consecutive rows, so a row attends to those first slots, the
    previous row and itself (`attention.packed_layout`), not to the whole stream. `common`:
    `prefix_kv` of a prefix that comes before every prompt (positions then start at its length
    S).
    Returns log-probs [P*m, Lc] (and entropies): slot j of stream p at row p * m + j."""
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
    cdt = self.compute_dtype_of(compute_dtype)
    h_rcd, _ = self.forward(packed_bkc.reshape(p * k, lc), s + position_bkc.reshape(p * k, lc),
                            attention.packed_layout(mask, p, w), layer_inputs=common,
                            compute_dtype=compute_dtype, frozen_layers=frozen_layers)
    h_bsd = jnp.take_along_axis(h_rcd.reshape(p, k * lc, -1), source_bkc.reshape(p, k * lc, 1),
                                axis=1)
    out = chunked_logprobs(h_bsd, self.lm_head_vd(), packed_bkc.reshape(p, k * lc),
                           temperature=temperature, chunk_size=chunk_size,
                           with_entropy=with_entropy, compute_dtype=cdt,
                           remat=self.config.remat)
    idx = unpack_bmc.reshape(p, m * lc)
    unpack = lambda x_bs: jnp.take_along_axis(x_bs, idx, axis=1).reshape(p * m, lc)  # noqa: E731
    return tuple(map(unpack, out)) if with_entropy else unpack(out)


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
