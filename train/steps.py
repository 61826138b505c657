"""Pure, jitted step functions over explicit state: log-prob passes, the GRPO update, the SFT update.

State is a pytree `TrainState(params, opt_state, step)`; the model's graph definition and its
non-trainable variables are closed over as static structure (`nnx.split`), so each step compiles
once per batch shape and the parameters are donated and updated in place.

SFT rows: `tokens_bl` holds prompt then response, `mask_bl` marks real tokens, positions are
`cumsum(mask) - 1`, and `loss_mask_bl` marks the *targets* that count: the target of input
position t is token t + 1, so a response token at index i has its log-prob at i - 1.
GRPO batches are grouped (rollout_batch.assemble): each prompt once, its completions beside it,
so the update runs a prompt's forward (and backward) once for its whole group.

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
from train import rollout_batch


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


def _completion_logprobs(graphdef, rest, params, mb, temperature, with_entropy,
                         top_layers: int = 0, common=None):
  """Log-probs (and entropies) of a grouped batch's completions, [G*m, Lc]: each group's prompt
  runs once for its m completions (Decoder.completion_logprobs), or, if the batch has them, over
  the prompt's real tokens and the completions packed end to end (rollout_batch.pack_groups;
  Decoder.packed_completion_logprobs; the prompt's width bounds the slots it may take).
  `top_layers`: as in `_policy`; `common`: the keys of the prefix before every prompt
  (`_prefix_kv`; packed batches only)."""
  model, frozen = _policy(graphdef, rest, params, top_layers)
  g, m, lc = mb["completion"].shape
  if "packed" in mb:
    return model.packed_completion_logprobs(
        mb["packed"], mb["packed_segment"], mb["packed_position"], mb["packed_source"],
        mb["packed_unpack"], prompt_width=mb["prompt"].shape[1],
        temperature=temperature, with_entropy=with_entropy, frozen_layers=frozen, common=common)
  return model.completion_logprobs(
      mb["prompt"], mb["prompt_mask"], mb["completion"].reshape(g * m, lc),
      mb["completion_mask"].reshape(g * m, lc), m, temperature=temperature,
      with_entropy=with_entropy, frozen_layers=frozen)


def _prefix_kv(graphdef, rest, params, prefix_s, top_layers: int = 0):
  """Decoder.prefix_kv of a batch's "prefix" (rollout_batch.assemble) under `params`."""
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


def _merge_micro(x):
  """Inverse of `_split_micro`: [M, B/M, ...] -> [B, ...] in the original row order."""
  return x.swapaxes(0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _num_micro(batch: dict, micro_batch: int) -> int:
  """Micro-batches of a grouped batch: `micro_batch` completions each, whole groups."""
  g, m = batch["completion"].shape[:2]
  return rollout_batch.num_micro(g, m, micro_batch)


def _micro_slice(x, i, n_micro: int):
  """Micro-batch `i` (a traced index) of `_split_micro(x, n_micro)`: rows i, i + M, ..."""
  out = _split_micro(x, n_micro)
  return jax.lax.dynamic_index_in_dim(out, i, axis=0, keepdims=False)


def _packed_micro(batch: dict, pack: dict, i, n_micro: int) -> dict:
  """Micro-batch `i` of a batch whose completions are packed per micro-batch (`pack`:
  rollout_batch.assemble's "packs"[i]): its rows of the [G, ...] arrays, with its packing."""
  rows = {k: _micro_slice(v, i, n_micro) for k, v in batch.items() if k != "packs"}
  return {**rows, **pack}


def make_logprob_fn(graphdef, rest, *, temperature: float, micro_batch: int,
                    mesh=None) -> Callable:
  """Jitted `(params, grouped batch) -> logp [G, m, Lc]` of the completions, in micro-batches of
  `micro_batch` completions (the reference pass; batch layout: rollout_batch.assemble). A batch
  with "packs" runs one call per micro-batch, each over its own packed rows (one compile per row
  count); otherwise one scan over the micro-batches."""
  drop = ("adv", "ref_logp", "old_logp")

  @functools.partial(jax.jit, compiler_options=compiler_options())
  @functools.partial(_on_mesh, mesh=mesh)
  def logprobs(params, batch):
    batch = {k: v for k, v in batch.items() if k not in drop}
    n_micro = _num_micro(batch, micro_batch)

    def one(_, mb):
      lp = _completion_logprobs(graphdef, rest, params, mb, temperature, False)
      return None, lp.reshape(mb["completion"].shape)

    _, out = jax.lax.scan(one, None, jax.tree.map(lambda x: _split_micro(x, n_micro), batch))
    return _merge_micro(out)

  @functools.partial(jax.jit, compiler_options=compiler_options())
  @functools.partial(_on_mesh, mesh=mesh)
  def packed_one(params, batch, pack, i, common):
    mb = _packed_micro(batch, pack, i, _num_micro(batch, micro_batch))
    lp = _completion_logprobs(graphdef, rest, params, mb, temperature, False, common=common)
    return lp.reshape(mb["completion"].shape)

  merge = jax.jit(lambda outs: _merge_micro(jnp.stack(outs)))
  prefix_kv = jax.jit(functools.partial(_prefix_kv, graphdef, rest))

  def call(params, batch):
    if "packs" not in batch:
      return logprobs(params, batch)
    common = prefix_kv(params, batch["prefix"]) if "prefix" in batch else None
    rows = {k: v for k, v in batch.items() if k not in drop + ("packs", "prefix")}
    return merge([packed_one(params, rows, pack, jnp.int32(i), common)
                  for i, pack in enumerate(batch["packs"])])

  return call


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
  """Jitted GRPO update (method.md 4.6-4.8): one optimizer step on a whole rollout batch.

  batch (rollout_batch.assemble): G groups of m completions sharing a prompt: prompt,
  prompt_mask [G, Lp] (left-padded); completion, completion_mask [G, m, Lc] (mask: response
  tokens up to and including the first EOS); adv [G, m]; ref_logp [G, m, Lc] (absent: no KL
  term, for kl_coef 0); optionally old_logp [G, m, Lc] (else the detached current log-probs:
  with one update per batch the policy is exactly on-policy, method.md 4.7); optionally "packs":
  per micro-batch its groups' prompts and completions packed (packed, packed_segment,
  packed_position, packed_source [G/M, k, Lc], packed_unpack [G/M, m, Lc]:
  rollout_batch.pack_groups), which its forward then runs over instead, k rows as that
  micro-batch needs (one compile per k). Micro-batches hold
  `micro_batch` completions, whole groups. `top_layers` > 0: only the top blocks train (pair it
  with `partial_training.mask_optimizer(tx, top_layers)`). With loss_cfg.blocks (token_mean over
  fixed blocks of sequences, the paper's) each sequence's weight comes from the whole batch's
  mask before the split (`_with_seq_weights`), so the loss depends on neither the mesh nor
  `micro_batch`.
  """
  def loss_fn(params, mb, common=None):
    logp, ent = _completion_logprobs(graphdef, rest, params, mb, temperature, True, top_layers,
                                     common)
    flat = lambda k: mb[k].reshape(logp.shape) if k in mb else None  # noqa: E731
    old = flat("old_logp") if "old_logp" in mb else jax.lax.stop_gradient(logp)
    w = mb["seq_w"].reshape(-1) if "seq_w" in mb else None
    s, c, metrics = grpo_obj.grpo_loss(logp, old, flat("ref_logp"), ent, mb["adv"].reshape(-1),
                                       flat("completion_mask"), loss_cfg, seq_weight_b=w)
    return s, (c, metrics)

  def _with_seq_weights(batch):
    """The batch with "seq_w" [G, m] (grpo_obj.token_mean_weights; rollout r is row r // m,
    column r % m) when the loss runs over fixed blocks of sequences."""
    if not loss_cfg.blocks:
      return batch
    g, m, lc = batch["completion"].shape
    w = grpo_obj.token_mean_weights(batch["completion_mask"].reshape(g * m, lc),
                                    loss_cfg.token_mean_seqs)
    return {**batch, "seq_w": w.reshape(g, m)}

  loss_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
  packed_loss_and_grad = jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True)

  def step_total(batch, n_micro):
    lc = batch["completion"].shape[-1]
    masks = _split_micro(batch["completion_mask"], n_micro)
    return jnp.sum(jax.vmap(lambda m: grpo_obj.aggregation_count(m.reshape(-1, lc), loss_cfg))(
        masks))

  @functools.partial(_on_mesh, mesh=mesh)
  def update(state: TrainState, batch: dict):
    n_micro = _num_micro(batch, micro_batch)
    batch = _with_seq_weights(batch)
    micro = jax.tree.map(lambda x: _split_micro(x, n_micro), batch)
    total = step_total(batch, n_micro)
    scale = lambda c: (1.0 if loss_cfg.blocks else  # noqa: E731
                       grpo_obj.accumulation_scale(loss_cfg, c, n_micro, total))
    loss, grads, _, raw = _accumulate(loss_and_grad, state.params, micro, scale,
                                      grpo_obj.merge_metrics)
    new_state, gnorm, finite = _apply(tx, state, grads, loss)
    return new_state, {"loss": loss, "grad_norm": gnorm, "finite": finite,
                       **grpo_obj.finalize_metrics(raw)}

  @functools.partial(_on_mesh, mesh=mesh)
  def packed_micro_step(params, common, grads, batch, pack, i):
    """grads + micro-batch i's scaled gradient (`_accumulate`'s term), its scaled loss, metrics.
    grads = (parameters', the common prefix keys' (`_prefix_kv`) or None)."""
    n_micro = _num_micro(batch, micro_batch)
    batch = _with_seq_weights(batch)
    mb = _packed_micro(batch, pack, i, n_micro)
    (s, (c, metrics)), g = packed_loss_and_grad(params, mb, common)
    w = (1.0 if loss_cfg.blocks else
         grpo_obj.accumulation_scale(loss_cfg, c, n_micro, step_total(batch, n_micro)))
    return jax.tree.map(lambda a, b: a + b * w, grads, g), s * w, metrics

  @functools.partial(_on_mesh, mesh=mesh)
  def packed_finish(state: TrainState, acc):
    """The optimizer step on the summed gradient; the prefix keys' gradient goes back through
    the prefix's forward (run again here: S tokens) into the parameters'."""
    (grads, d_common), losses, raws, prefix = acc
    if prefix is not None:
      _, pull = jax.vjp(lambda p: _prefix_kv(graphdef, rest, p, prefix, top_layers),
                        state.params)
      grads = jax.tree.map(jnp.add, grads, pull(d_common)[0])
    loss = functools.reduce(jnp.add, losses)
    new_state, gnorm, finite = _apply(tx, state, grads, loss)
    return new_state, {"loss": loss, "grad_norm": gnorm, "finite": finite,
                       **grpo_obj.reduce_metrics(raws)}

  scanned, finish, jitted = jit_state_step(update), jit_state_step(packed_finish), {}

  def call(state: TrainState, batch: dict):
    """One scan over the micro-batches; with "packs", one call per micro-batch instead (each
    over its own packed rows), the gradient summed in place, then the optimizer step."""
    if "packs" not in batch:
      return scanned(state, batch)
    if not jitted:  # the gradient sum keeps the parameters' shardings
      shardings = jax.tree.map(lambda x: x.sharding, state.params)
      jitted["prefix"] = jax.jit(functools.partial(_prefix_kv, graphdef, rest,
                                                   top_layers=top_layers))
      jitted["zeros"] = jax.jit(lambda t: jax.tree.map(jnp.zeros_like, t),
                                out_shardings=(shardings, None))
      jitted["micro"] = jax.jit(packed_micro_step, donate_argnums=(2,),
                                out_shardings=((shardings, None), None, None),
                                compiler_options=compiler_options())
    prefix = batch.get("prefix")
    common = None if prefix is None else jitted["prefix"](state.params, prefix)
    rows = {k: v for k, v in batch.items() if k not in ("packs", "prefix")}
    grads, losses, raws = jitted["zeros"]((state.params, common)), [], []
    for i, pack in enumerate(batch["packs"]):
      grads, s, raw = jitted["micro"](state.params, common, grads, rows, pack, jnp.int32(i))
      losses.append(s)
      raws.append(raw)
    return finish(state, (grads, losses, raws, prefix))

  call.lower = scanned.lower  # the scanned update (a batch without "packs"), unrun
  return call


def make_sft_update(graphdef, rest, tx, *, micro_batch: int, mesh=None,
                    top_layers: int = 0, response_len: int | None = None) -> Callable:
  """Jitted SFT update (method.md 3.3-3.4): CE on response tokens + EOS, token mean per
  micro-batch averaged over micro-batches (verl's per-rank mean), one optimizer step.
  `response_len`: every loss target lies in the last that many columns (left-padded rows), so
  the LM head runs there only. `top_layers` as in `make_grpo_update`. A batch with "prefix"
  [S] (replicated): tokens before every row, which then holds only what follows them
  (train/sft.py `shared_prefix_len`); the prefix runs once per micro-batch instead of once
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
