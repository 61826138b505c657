"""Rollouts (or SFT examples) -> the training batches that `train.steps` consumes."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cqr_jax import shared_prefix, sharding


def place(x: np.ndarray, mesh) -> jax.Array:
  """Puts a host array on the mesh with its leading (batch) axis over data x fsdp.

  `x` is the whole global batch, identical on every process (every process runs the same seeded
  pipeline). One process: a plain `device_put`. Several processes (design.md "Mesh"): the global
  array is built from `x` by `sharding.put_global`, each process handing its own devices the
  rows they hold. That holds for any device order: a TPU slice's mesh can interleave the
  processes along the batch axis (0,1,2,3,0,1,2,3,... on v4-32 / v5p-32, issue 32), so a
  process's rows need not be one contiguous block.
  """
  if mesh is None:
    return jax.device_put(x)
  x = np.asarray(x)
  if x.ndim == 0:
    raise ValueError("rollout_batch.place: expected an array with a leading batch axis, got a "
                     "scalar")
  return sharding.put_global(x, sharding.batch_sharding(mesh, x.ndim))


def place_replicated(x: np.ndarray, mesh) -> jax.Array:
  """Puts a host array, identical on every process, on every device of the mesh."""
  if mesh is None:
    return jax.device_put(x)
  return sharding.put_global(np.asarray(x), NamedSharding(mesh, P()))


def group_size(n: int, micro_batch: int, data_parallel: int = 1) -> int:
  """Completions per prompt forward in the GRPO update: the largest divisor m of n such that a
  micro-batch of `micro_batch` completions holds whole groups, as many as a multiple of the
  data-parallel devices (so each device gets whole groups). m = n shares a prompt's forward and
  backward across all its samples; m = 1 is one row per completion (prompt repeated)."""
  for m in range(n, 0, -1):
    if n % m == 0 and micro_batch % m == 0 and (micro_batch // m) % data_parallel == 0:
      return m
  return 1


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("tokens", "segment", "position", "source", "unpack", "rollout",
                                "lengths", "prefix", "adv", "ref_logp", "old_logp"),
                   meta_fields=("prompt_width",))
@dataclasses.dataclass(frozen=True)
class GRPOBatch:
  """A GRPO step's rollouts as `Decoder.packed_completion_logprobs` streams (`grpo_batch`).

  A stream is k rows of Lc slots: one group's prompt (its real tokens, after the step's shared
  prefix) then up to m of its completions end to end (`pack_streams`). The streams run in C calls
  of P streams each (C = `num_calls`, data-dependent; every call has the same shape, so the update
  and the reference pass compile once). Call-axis fields [C, P, ...] are sharded over
  (data, fsdp) on P; the others are replicated.

  tokens, segment, position, source [C, P, k, Lc]; unpack [C, P, m, Lc]: the streams
    (`pack_streams`); rollout [C, P, m]: the rollout (row-major index into the step's R rollouts)
    completion slot j of a stream holds, -1 if none (its log-probs then weigh nothing).
  lengths [R]: each rollout's completion_mask length (response tokens up to and including the
    first EOS, method.md 4.5); a mask is a prefix of ones, so this is the whole mask.
  prefix [S] | None: tokens before every prompt, run once a step (`Decoder.prefix_kv`).
  adv [R] | None: sequence advantages; ref_logp, old_logp [C, P, m, Lc] | None: per slot, as the
    reference pass (`train.steps.make_logprob_fn`) returns them.
  prompt_width (static): the slots that may hold a prompt (its left-padded width).
  """
  tokens: Any
  segment: Any
  position: Any
  source: Any
  unpack: Any
  rollout: Any
  lengths: Any
  prefix: Any = None
  adv: Any = None
  ref_logp: Any = None
  old_logp: Any = None
  prompt_width: int = 0

  CALL_FIELDS = ("tokens", "segment", "position", "source", "unpack", "rollout", "ref_logp",
                 "old_logp")

  @property
  def num_calls(self) -> int:
    return self.tokens.shape[0]

  @property
  def rows(self) -> int:
    """Packed rows of Lc slots a step: C * P * k."""
    return int(np.prod(self.tokens.shape[:3]))

  def call(self, i: int) -> "GRPOBatch":
    """Call i's view: call-axis fields [P, ...], the rest as they are, no prefix (the update
    runs it once a step). Works on ShapeDtypeStruct leaves too (abstract lowering)."""
    return dataclasses.replace(self, prefix=None, **{
        f: _take(getattr(self, f), i) for f in self.CALL_FIELDS if getattr(self, f) is not None})

  def completion_mask(self):
    """[..., m, Lc] (a call's or the whole batch's): slot j's response tokens."""
    lc = self.unpack.shape[-1]
    length = jnp.where(self.rollout >= 0, self.lengths[jnp.maximum(self.rollout, 0)], 0)
    return jnp.arange(lc) < length[..., None]

  def rollout_mask(self):
    """[R, Lc]: every rollout's completion_mask, in rollout order."""
    return jnp.arange(self.unpack.shape[-1]) < self.lengths[:, None]

  def per_slot(self, x_r):
    """[..., m] (or [..., m, ...]) values of a per-rollout array x_r [R, ...] at each slot (0
    where the slot holds nothing)."""
    idx = jnp.maximum(self.rollout, 0)
    real = (self.rollout >= 0).reshape(self.rollout.shape + (1,) * (x_r.ndim - 1))
    return jnp.where(real, x_r[idx], 0)


def _take(x, i: int):
  """x[i]; for a ShapeDtypeStruct, its shape and sharding less the leading axis."""
  if not isinstance(x, jax.ShapeDtypeStruct):
    return x[i]
  sh = x.sharding
  if isinstance(sh, NamedSharding):
    sh = NamedSharding(sh.mesh, P(*tuple(sh.spec)[1:]))
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sh)


def per_rollout(batch: GRPOBatch, x_slots, rollouts: int) -> np.ndarray:
  """Host inverse of the slot layout: per-slot values x [C, P, m, ...] -> [R, ...] in rollout
  order (e.g. the reference pass's log-probs, for checks)."""
  x, idx = np.asarray(x_slots), np.asarray(batch.rollout)
  out = np.zeros((rollouts,) + x.shape[3:], x.dtype)
  out[idx[idx >= 0]] = x[idx >= 0]
  return out


def call_sharding(mesh, ndim: int) -> NamedSharding:
  """[C, P, ...] with P over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(None, sharding.BATCH_AXES, *([None] * (ndim - 2))))


def stream_rows(prompt_width: int, m: int, lc: int, pack_rows: int = 0) -> int:
  """k, the rows of Lc slots a stream has (grpo.pack_rows): `pack_rows`, at least what a prompt
  and one completion need, at most what a prompt and all m need (0: that worst case)."""
  worst = -(-(prompt_width + m * lc) // lc)
  if pack_rows <= 0:
    return worst
  return min(max(pack_rows, -(-(prompt_width + lc) // lc)), worst)


def streams_per_call(micro_batch: int, m: int, data_parallel: int = 1) -> int:
  """P, the streams of one call (micro-batch): micro_batch // m groups' worth, rounded up to a
  multiple of the data-parallel devices (each holds P / data_parallel of them)."""
  return -(-(micro_batch // m) // data_parallel) * data_parallel


def grpo_batch(roll, mesh, micro_batch: int, pack_rows: int = 0,
               shared_prefix_min: int = 0) -> GRPOBatch:
  """The GRPO batch (`GRPOBatch`) of rollouts with n samples a prompt (rollout order: prompt-major).

  The n samples of a prompt are split into groups of m = `group_size(...)`; each group's prompt
  and completions are packed into streams of k = `stream_rows(..., pack_rows)` rows
  (`pack_streams`: completions that do not fit go to a continuation stream that repeats the
  prompt); the streams, in group order, fill calls of P = `streams_per_call(...)` streams (the
  last call padded with empty streams). With `shared_prefix_min` > 0 and prompts that share a
  prefix of at least that many tokens (`cqr_jax.shared_prefix.split_prompts`), that prefix is
  `prefix` and the prompts hold only what follows it."""
  rows = len(roll.finish_reasons)
  m = group_size(roll.n, micro_batch, sharding.data_parallel_size(mesh))
  lc = roll.completion_ids.shape[1]
  prompt, prompt_mask = roll.prompt_ids[:rows:m], roll.prompt_mask[:rows:m] > 0
  completion = roll.completion_ids[:rows].reshape(-1, m, lc)
  completion_mask = roll.completion_mask[:rows].reshape(-1, m, lc) > 0
  prefix = None
  if shared_prefix_min > 0:
    ids, mask, s = shared_prefix.split_prompts(prompt, prompt_mask, len(prompt),
                                               shared_prefix_min, 0)
    if s:
      prefix, prompt, prompt_mask = ids[0, :s], ids[:, s:], mask[:, s:]
  width = prompt.shape[1]
  streams = pack_streams(prompt, prompt_mask, completion, completion_mask,
                         stream_rows(width, m, lc, pack_rows))
  per_call = streams_per_call(micro_batch, m, sharding.data_parallel_size(mesh))
  calls = -(-len(streams["rollout"]) // per_call)

  def by_call(x, fill):
    pad = calls * per_call - len(x)
    x = np.concatenate([x, np.full((pad,) + x.shape[1:], fill, x.dtype)])
    x = x.reshape((calls, per_call) + x.shape[1:])
    return jax.device_put(x) if mesh is None else sharding.put_global(
        x, call_sharding(mesh, x.ndim))

  fills = {"segment": -1, "rollout": -1}
  placed = {k: by_call(v, fills.get(k, 0)) for k, v in streams.items()}
  lengths = completion_mask.sum(-1).reshape(-1).astype(np.int32)
  return GRPOBatch(**placed, lengths=place_replicated(lengths, mesh),
                   prefix=None if prefix is None else place_replicated(
                       prefix.astype(np.int32), mesh),
                   prompt_width=width)


def pack_streams(prompt_gp: np.ndarray, prompt_mask_gp: np.ndarray, completion_gmc: np.ndarray,
                 mask_gmc: np.ndarray, rows: int) -> dict[str, np.ndarray]:
  """Each group's prompt (its real tokens) then its completions (their masked tokens, a prefix of
  each row) end to end in streams of `rows` rows of Lc slots: `Decoder.packed_completion_logprobs`'
  inputs. A completion goes to the first of its group's streams with room for it (first fit, in
  completion order), else to a new stream that starts with the prompt again (a continuation
  stream). A stream's tail is empty; the prompts' left padding and the completions' right padding
  are gone.

  Returns, for N streams (group order): tokens [N, rows, Lc] (0 in empty slots); segment (the
  completion slot 0..m-1 a slot holds, m for the prompt, -1 if empty); position (0, 1, .. through
  the prompt, then prompt length + the token's index in its completion); source (the slot whose
  output predicts the slot's token: the prompt's last for a completion's first token, else the
  slot before); unpack [N, m, Lc] (slot of completion slot j's token t in the stream's rows * Lc
  slots; 0 past its end); rollout [N, m] (g * m + j of the completion in slot j, -1 if none)."""
  g, m, lc = completion_gmc.shape
  lengths_gm = mask_gmc.sum(-1)
  if np.any(mask_gmc != (np.arange(lc) < lengths_gm[..., None])):
    raise ValueError("pack_streams: every completion_mask row must be a prefix of ones")
  prompts = [row[mask] for row, mask in zip(prompt_gp, np.asarray(prompt_mask_gp, bool))]
  if min(len(r) for r in prompts) == 0:
    raise ValueError("pack_streams: every group needs at least one real prompt token")
  cap = rows * lc
  plan = []  # (group, [completion j, ...]) per stream
  for i, prompt in enumerate(prompts):
    if len(prompt) + lc > cap:
      raise ValueError(f"pack_streams: a prompt of {len(prompt)} tokens and a completion of {lc} "
                       f"do not fit a stream of {rows} rows of {lc}")
    used, mine = [], []
    for j in range(m):
      n = int(lengths_gm[i, j])
      s = next((s for s in range(len(mine)) if used[s] + n <= cap), None)
      if s is None:
        used.append(len(prompt))
        mine.append([])
        s = len(mine) - 1
      used[s] += n
      mine[s].append(j)
    plan += [(i, js) for js in mine]
  n_streams = len(plan)
  tokens = np.zeros((n_streams, cap), np.int32)
  segment = np.full((n_streams, cap), -1, np.int32)
  position = np.zeros((n_streams, cap), np.int32)
  source = np.zeros((n_streams, cap), np.int32)
  unpack = np.zeros((n_streams, m, lc), np.int32)
  rollout = np.full((n_streams, m), -1, np.int32)
  for s, (i, js) in enumerate(plan):
    prompt = prompts[i]
    lp = len(prompt)
    tokens[s, :lp], segment[s, :lp], position[s, :lp] = prompt, m, np.arange(lp)
    source[s, 1:lp] = np.arange(lp - 1)
    start = lp
    for q, j in enumerate(js):
      span = np.arange(start, start + int(lengths_gm[i, j]))
      tokens[s, span], segment[s, span] = completion_gmc[i, j, :len(span)], q
      position[s, span] = lp + np.arange(len(span))
      source[s, span] = np.concatenate([[lp - 1], span[:-1]])[:len(span)]
      unpack[s, q, :len(span)] = span
      rollout[s, q] = i * m + j
      start += len(span)
  shape = (n_streams, rows, lc)
  return {"tokens": tokens.reshape(shape), "segment": segment.reshape(shape),
          "position": position.reshape(shape), "source": source.reshape(shape),
          "unpack": unpack, "rollout": rollout}


def pad_left(seqs: list[list[int]], length: int, pad_id: int) -> np.ndarray:
  """[B, length] with each sequence at the end of its row (longer ones keep their last tokens)."""
  out = np.full((len(seqs), length), pad_id, np.int32)
  for i, s in enumerate(seqs):
    s = s[-length:]
    out[i, length - len(s):] = s
  return out


def bucket_length(n: int, multiple: int = 64) -> int:
  return max(multiple, -(-n // multiple) * multiple)
