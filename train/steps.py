"""Pure, jitted step functions over explicit state: log-prob passes, the GRPO update, the SFT update.

State is a pytree `TrainState(params, opt_state, step)`; the model's graph definition and its
non-trainable variables are closed over as static structure (`nnx.split`), so each step compiles
once per batch shape and the parameters are donated and updated in place.

SFT rows: `tokens_bl` holds prompt then response, `mask_bl` marks real tokens, positions are
`cumsum(mask) - 1`, and `loss_mask_bl` marks the *targets* that count: the target of input
position t is token t + 1, so a response token at index i has its log-prob at i - 1.
GRPO batches are packed (rollout_batch.GRPOBatch): each prompt's real tokens then its completions
end to end in streams of a fixed number of rows, so the update runs a prompt's forward (and
backward) once for the completions of its stream, and compiles once a run.

With a `mesh`, every step function is traced under `sharding.activation_mesh(mesh)`: each
micro-batch's rows and the model's residual stream and LM head stay sharded over
("data", "fsdp") (`sharding.constrain_rows`). Without one (or on one device) nothing is
constrained.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import optax

from cqr_jax import partial_training, sharding
from cqr_jax.compile_options import compiler_options
from cqr_jax.objectives import grpo as grpo_obj
from cqr_jax.objectives import sft as sft_obj


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  params: Any
  opt_state: Any
  step: jax.Array  # int32 scalar: optimizer updates applied


def split_model(model: nnx.Module):
  """(graphdef, params, rest): trainable `nnx.Param`s apart from everything else."""
  return nnx.split(model, nnx.Param, ...)


def positions_from_mask(mask_bl: jax.Array) -> jax.Array:
  return jnp.maximum(jnp.cumsum(mask_bl.astype(jnp.int32), axis=-1) - 1, 0)


def _policy(graphdef, rest, params, top_layers: int):
  """(model, frozen block count): with `top_layers` > 0 only the top blocks and the final norm
  are differentiable (cqr_jax.partial_training); the rest is held fixed."""
  if top_layers <= 0:
    return nnx.merge(graphdef, params, rest), 0
  params = partial_training.stop_frozen(params, partial_training.labels(params, top_layers))
  model = nnx.merge(graphdef, params, rest)
  return model, model.config.num_layers - top_layers


def _target_logprobs(graphdef, rest, params, tokens_bl, mask_bl, temperature, with_entropy,
                     tail: int | None = None, top_layers: int = 0, prefix_s=None):
  """log softmax(logits / T) at each next token: [B, L-1] (and entropy [B, L-1]).

  With `tail`, only the last `tail` targets go through the LM head; the other entries are 0
  (they must be masked out of every loss). The trunk still runs over the whole sequence.
  `top_layers`: as in `_policy`. `prefix_s` [S]: tokens before every row (left-padded rows
  then hold only what follows them), run once (`Decoder.prefix_kv`) and attended to by all
  positions; a row's first token is not a target (its state lies in the prefix).
  """
  model, frozen = _policy(graphdef, rest, params, top_layers)
  common, s = None, 0
  if prefix_s is not None:
    common, s = model.prefix_kv(prefix_s), prefix_s.shape[0]
  inputs, targets = tokens_bl[:, :-1], tokens_bl[:, 1:]
  return model.token_logprobs(inputs, s + positions_from_mask(mask_bl)[:, :-1], mask_bl[:, :-1],
                              targets, temperature=temperature, with_entropy=with_entropy,
                              last=tail, frozen_layers=frozen, common=common)


def _completion_logprobs(graphdef, rest, params, call, temperature, with_entropy,
                         top_layers: int = 0, common=None):
  """Log-probs (and entropies) [P*m, Lc] of one call of a GRPO batch (rollout_batch.GRPOBatch
  .call: P streams of a prompt and its completions packed end to end;
  Decoder.packed_completion_logprobs), slot j of stream p at row p * m + j. `top_layers`: as in
  `_policy`; `common`: the keys of the prefix before every prompt (`_prefix_kv`)."""
  model, frozen = _policy(graphdef, rest, params, top_layers)
  call = dataclasses.replace(call, **{f: sharding.constrain_rows(getattr(call, f)) for f in (
      "tokens", "segment", "position", "source", "unpack", "rollout")})
  return model.packed_completion_logprobs(
      call.tokens, call.segment, call.position, call.source, call.unpack,
      prompt_width=call.prompt_width, temperature=temperature, with_entropy=with_entropy,
      frozen_layers=frozen, common=common)


def _prefix_kv(graphdef, rest, params, prefix_s, top_layers: int = 0):
  """Decoder.prefix_kv of a batch's prefix (rollout_batch.GRPOBatch) under `params`."""
  return _policy(graphdef, rest, params, top_layers)[0].prefix_kv(prefix_s)


def _on_mesh(fn: Callable, mesh) -> Callable:
  """`fn` traced under `sharding.activation_mesh(mesh)` (its constraints pin to `mesh`)."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def traced(*args, **kw):
    with sharding.activation_mesh(mesh):
      return fn(*args, **kw)
  return traced


def _split_micro(x, n_micro: int):
  """[B, ...] -> [M, B/M, ...] with micro-batch m = rows m, m + M, m + 2M, ... (strided).

  A batch sharded over (data, fsdp) in contiguous blocks then keeps every micro-batch spread over
  all devices (a contiguous split would put whole micro-batches on single devices and serialise
  the scan). Under a mesh the [B/M] axis is pinned to (data, fsdp) too: after the reshape the
  partitioner would shard M instead, and each device would then run whole micro-batches.
  """
  out = x.reshape((x.shape[0] // n_micro, n_micro) + x.shape[1:]).swapaxes(0, 1)
  return sharding.constrain_rows(out, axis=1)


def make_logprob_fn(graphdef, rest, *, temperature: float, micro_batch: int,
                    mesh=None) -> Callable:
  """`(params, GRPOBatch) -> logp [C, P, m, Lc]` of every completion slot (the reference pass;
  rollout_batch.grpo_batch): one jitted call per call of P streams, all of one shape (one
  compile a run), the step's shared prefix run once. `micro_batch` is the batch's (its calls
  hold micro_batch // m streams)."""
  del micro_batch  # the batch's calls already have that many streams

  @functools.partial(jax.jit, compiler_options=compiler_options())
  @functools.partial(_on_mesh, mesh=mesh)
  def one(params, call, common):
    lp = _completion_logprobs(graphdef, rest, params, call, temperature, False, common=common)
    return lp.reshape(call.unpack.shape)

  prefix_kv = jax.jit(functools.partial(_prefix_kv, graphdef, rest))

  def logprobs(params, batch):
    batch = dataclasses.replace(batch, adv=None, ref_logp=None, old_logp=None)
    common = None if batch.prefix is None else prefix_kv(params, batch.prefix)
    return jnp.stack([one(params, batch.call(i), common) for i in range(batch.num_calls)])

  logprobs.one = one
  return logprobs


def _accumulate(loss_and_grad, params, micro_xs, scale_fn: Callable, merge: Callable):
  """Sums scaled per-micro-batch gradients: Σ_m scale_m · ∇loss_sum_m equals ∇(step loss) exactly.

  `loss_and_grad(params, mb) -> ((loss_sum, (count, metrics)), grads)`; `scale_fn(count)` is the
  factor of one micro-batch (e.g. 1 / (count · M) for verl's token mean, method.md 4.7). The first
  micro-batch seeds the carry (so max/min metrics start from real values); a scan runs the rest.
  Returns (step loss, grads, total count, merged raw metrics).
  """
  def one(mb):
    (s, (c, metrics)), g = loss_and_grad(params, mb)
    w = scale_fn(c)
    return jax.tree.map(lambda b: b * w, g), s * w, c, metrics

  carry = one(jax.tree.map(lambda x: x[0], micro_xs))
  rest = jax.tree.map(lambda x: x[1:], micro_xs)
  if jax.tree.leaves(rest)[0].shape[0]:
    def body(acc, mb):
      g, s, c, m = one(mb)
      return (jax.tree.map(jnp.add, acc[0], g), acc[1] + s, acc[2] + c, merge(acc[3], m)), None
    carry, _ = jax.lax.scan(body, carry, rest)
  grads, loss, count, metrics = carry
  return loss, grads, count, metrics


def _apply(tx, state: TrainState, grads, loss):
  """AdamW update unless the loss or the gradient is non-finite (then the state is unchanged)."""
  gnorm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
  updates, new_opt = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = TrainState(params=keep(new_params, state.params),
                         opt_state=keep(new_opt, state.opt_state),
                         step=state.step + finite.astype(jnp.int32))
  return new_state, gnorm, finite


def jit_state_step(fn: Callable) -> Callable:
  """jit(fn) over (state, batch), donating the state and pinning the new state's shardings to the
  old one's, so step 2 onward reuses step 1's executable (one compile per batch shape).
  `.lower(state, batch)` lowers that jit without running it (e.g. on ShapeDtypeStructs that
  carry shardings: bench/memory_plan.py)."""
  cache = {}

  def jitted(state):
    if "f" not in cache:
      shardings = jax.tree.map(lambda x: x.sharding, state)
      cache["f"] = jax.jit(fn, donate_argnums=(0,), out_shardings=(shardings, None),
                           compiler_options=compiler_options())
    return cache["f"]

  def call(state, batch):
    return jitted(state)(state, batch)

  call.lower = lambda state, batch: jitted(state).lower(state, batch)
  return call


def make_grpo_update(graphdef, rest, tx, loss_cfg, *, temperature: float,
                     micro_batch: int, mesh=None, top_layers: int = 0) -> Callable:
  """GRPO update (method.md 4.6-4.8): one optimizer step on a whole rollout batch.

  batch: rollout_batch.GRPOBatch (its adv set; ref_logp from `make_logprob_fn`, absent: no KL
  term, for kl_coef 0; old_logp absent: the detached current log-probs, exactly on-policy with
  one update per batch, method.md 4.7). The micro-batch is one call of the batch: P streams
  (micro_batch // m groups' worth, a group's completions possibly spread over continuation
  streams). One jitted call per micro-batch adds its scaled gradient in place (one compile a
  run: every call has the same shape), then one jitted optimizer step; the step's shared prefix
  runs once, its keys' gradient summed over the calls and pulled back through its forward.
  With loss_cfg.blocks (token_mean over fixed blocks of sequences, the paper's) each sequence's
  weight comes from the whole step's lengths (`GRPOBatch.lengths`), so the loss depends on
  neither the mesh, nor `micro_batch`, nor how the streams fall into calls; the other
  aggregations divide by the whole step's count (`accumulation_scale`), and token_mean without
  blocks averages the calls' token means. `top_layers` > 0: only the top blocks train (pair it
  with `partial_training.mask_optimizer(tx, top_layers)`). `.lower(state, batch)` lowers one
  call's gradient program (the update's peak memory: bench/memory_plan.py).
  """
  del micro_batch  # the batch's calls already have that many streams

  def loss_fn(params, call, common):
    logp, ent = _completion_logprobs(graphdef, rest, params, call, temperature, True, top_layers,
                                     common)
    flat = lambda x: None if x is None else x.reshape(logp.shape)  # noqa: E731
    old = flat(call.old_logp) if call.old_logp is not None else jax.lax.stop_gradient(logp)
    w = None
    if loss_cfg.blocks:
      w_r = grpo_obj.token_mean_weights(call.rollout_mask(), loss_cfg.token_mean_seqs)
      w = call.per_slot(w_r).reshape(-1)
    s, c, metrics = grpo_obj.grpo_loss(logp, old, flat(call.ref_logp), ent,
                                       call.per_slot(call.adv).reshape(-1),
                                       flat(call.completion_mask()), loss_cfg, seq_weight_b=w)
    return s, (c, metrics)

  loss_and_grad = jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True)

  @functools.partial(_on_mesh, mesh=mesh)
  def micro_step(params, common, grads, call, num_calls):
    """grads + this call's scaled gradient (`_accumulate`'s term), its scaled loss, metrics.
    grads = (parameters', the common prefix keys' (`_prefix_kv`) or None)."""
    (s, (c, metrics)), g = loss_and_grad(params, call, common)
    w = 1.0
    if not loss_cfg.blocks:
      total = grpo_obj.aggregation_count(call.rollout_mask(), loss_cfg)
      w = grpo_obj.accumulation_scale(loss_cfg, c, num_calls, total)
    return jax.tree.map(lambda a, b: a + b * w, grads, g), s * w, metrics

  @functools.partial(_on_mesh, mesh=mesh)
  def finish(state: TrainState, grads, d_common, prefix, loss):
    """The optimizer step on the summed gradient; the prefix keys' gradient goes back through
    the prefix's forward (run again here: S tokens) into the parameters'."""
    if prefix is not None:
      _, pull = jax.vjp(lambda p: _prefix_kv(graphdef, rest, p, prefix, top_layers),
                        state.params)
      grads = jax.tree.map(jnp.add, grads, pull(d_common)[0])
    new_state, gnorm, finite = _apply(tx, state, grads, loss)
    return new_state, {"loss": loss, "grad_norm": gnorm, "finite": finite}

  finish_jit, jitted = jit_state_step(lambda state, acc: finish(state, *acc)), {}

  def micro_jit(params):
    if not jitted:  # the gradient sum keeps the parameters' shardings
      shardings = jax.tree.map(lambda x: x.sharding, params)
      jitted["prefix"] = jax.jit(functools.partial(_prefix_kv, graphdef, rest,
                                                   top_layers=top_layers))
      jitted["zeros"] = jax.jit(lambda t: jax.tree.map(jnp.zeros_like, t),
                                out_shardings=(shardings, None))
      jitted["micro"] = jax.jit(micro_step, donate_argnums=(2,),
                                out_shardings=((shardings, None), None, None),
                                compiler_options=compiler_options())
    return jitted["micro"]

  def call(state: TrainState, batch):
    """One jitted call per micro-batch (the gradient summed in place), then the optimizer step."""
    micro = micro_jit(state.params)
    common = None if batch.prefix is None else jitted["prefix"](state.params, batch.prefix)
    grads, losses, raws = jitted["zeros"]((state.params, common)), [], []
    num_calls = jnp.float32(batch.num_calls)
    for i in range(batch.num_calls):
      grads, s, raw = micro(state.params, common, grads, batch.call(i), num_calls)
      losses.append(s)
      raws.append(raw)
    loss = functools.reduce(jnp.add, losses)
    state, out = finish_jit(state, (grads[0], grads[1], batch.prefix, loss))
    return state, {**out, **grpo_obj.reduce_metrics(raws)}

  def lower(state: TrainState, batch):
    """One call's gradient program, lowered (not run) on `batch`'s call 0; ShapeDtypeStructs
    with shardings will do (bench/memory_plan.py). No prefix."""
    return micro_jit(state.params).lower(state.params, None, (state.params, None),
                                         batch.call(0), jax.ShapeDtypeStruct((), jnp.float32))

  call.lower = lower
  call.compiles = lambda: {k: jitted[k]._cache_size() for k in ("micro",) if k in jitted}
  return call


def make_sft_update(graphdef, rest, tx, *, micro_batch: int, mesh=None,
                    top_layers: int = 0, response_len: int | None = None) -> Callable:
  """Jitted SFT update (method.md 3.3-3.4): CE on response tokens + EOS, token mean per
  micro-batch averaged over micro-batches (verl's per-rank mean), one optimizer step.
  `response_len`: every loss target lies in the last that many columns (left-padded rows), so
  the LM head runs there only. `top_layers` as in `make_grpo_update`. A batch with "prefix"
  [S] (replicated): tokens before every row, which then holds only what follows them
  (`cqr_jax.shared_prefix.for_examples`); the prefix runs once per micro-batch instead of once
  per row, its gradient flowing back through that forward."""

  def loss_fn(params, mb, prefix_s=None):
    logp = _target_logprobs(graphdef, rest, params, mb["tokens"], mb["mask"], 1.0, False,
                            response_len, top_layers, prefix_s)
    s, c = sft_obj.sft_loss(logp, mb["loss_mask"][:, 1:])
    return s, (c, {})

  @functools.partial(_on_mesh, mesh=mesh)
  def update(state: TrainState, batch: dict):
    batch = dict(batch)
    prefix = batch.pop("prefix", None)
    loss_and_grad = jax.value_and_grad(lambda p, mb: loss_fn(p, mb, prefix), has_aux=True)
    n_micro = max(batch["tokens"].shape[0] // micro_batch, 1)
    micro = jax.tree.map(lambda x: _split_micro(x, n_micro), batch)
    scale = lambda c: 1.0 / (jnp.maximum(c, 1.0) * n_micro)  # noqa: E731
    loss, grads, count, _ = _accumulate(loss_and_grad, state.params, micro, scale,
                                        lambda a, b: a)
    new_state, gnorm, finite = _apply(tx, state, grads, loss)
    return new_state, {"loss": loss, "grad_norm": gnorm, "finite": finite, "tokens": count}

  return jit_state_step(update)


def init_state(params, tx) -> TrainState:
  """Optimizer state beside the params; leaves that land off the params' mesh (step counters)
  are replicated onto it, so the whole state lives on one mesh."""
  from jax.sharding import NamedSharding, PartitionSpec
  state = TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
  mesh = next((x.sharding.mesh for x in jax.tree.leaves(params)
               if isinstance(x.sharding, NamedSharding)), None)
  if mesh is None:
    return state
  rep = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding)
                      else jax.device_put(x, rep), state)
