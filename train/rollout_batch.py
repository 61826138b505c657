"""Rollouts (or SFT examples) -> the padded training batches that `train.steps` consumes."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cqr_jax import distributed, sharding


def place(x: np.ndarray, mesh) -> jax.Array:
  """Puts a host array on the mesh with its leading (batch) axis over data x fsdp.

  `x` is the whole global batch, identical on every process (every process runs the same seeded
  pipeline). One process: a plain `device_put`. Several processes (design.md "Mesh"): each
  process hands over only the rows its own devices hold (`distributed.process_slice` read off
  the sharding) and `jax.make_array_from_process_local_data` stitches the global array, so no
  process ships, or needs to address, another process's rows.
  """
  if mesh is None:
    return jax.device_put(x)
  spec = P(("data", "fsdp"), *([None] * (x.ndim - 1)))
  sharding = NamedSharding(mesh, spec)
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  x = np.asarray(x)
  if x.ndim == 0:
    raise ValueError("rollout_batch.place: expected an array with a leading batch axis, got a "
                     "scalar")
  rows = distributed.process_slice(x.shape[0], mesh, spec)
  return jax.make_array_from_process_local_data(sharding, x[rows], x.shape)


def place_replicated(x: np.ndarray, mesh) -> jax.Array:
  """Puts a host array, identical on every process, on every device of the mesh."""
  if mesh is None:
    return jax.device_put(x)
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  return jax.make_array_from_process_local_data(sharding, x, x.shape)


def group_size(n: int, micro_batch: int, data_parallel: int = 1) -> int:
  """Completions per prompt forward in the GRPO update: the largest divisor m of n such that a
  micro-batch of `micro_batch` completions holds whole groups, as many as a multiple of the
  data-parallel devices (so each device gets whole groups). m = n shares a prompt's forward and
  backward across all its samples; m = 1 is one row per completion (prompt repeated)."""
  for m in range(n, 0, -1):
    if n % m == 0 and micro_batch % m == 0 and (micro_batch // m) % data_parallel == 0:
      return m
  return 1


def assemble(roll, mesh, micro_batch: int, pack: bool = False,
             shared_prefix_min: int = 0) -> dict:
  """The grouped GRPO batch (train.steps.make_grpo_update) of rollouts with n samples a prompt:
  the n samples of a prompt are split into groups of m = `group_size(...)`, each group one row:
  prompt, prompt_mask [G, Lp] (left-padded); completion, completion_mask [G, m, Lc], the mask
  marking response tokens up to and including the first EOS (method.md 4.5). G = rows / m; the
  group of row-major rollout r is r // m (so reshape per-rollout values [rows] to [G, m]).
  With `pack`, also "packs": per micro-batch (`micro_groups`), its groups' completions packed end
  to end (`pack_groups`) in as many rows as that micro-batch needs; the model then runs over
  those slots instead of m padded rows, one compiled shape per row count. With `pack` and
  `shared_prefix_min` > 0, when the prompts share a prefix of at least that many tokens
  (`cqr_jax.sampler.shared_prefix_layout`: rounded down to a multiple of 16), also "prefix" [S]
  (replicated), and the prompts hold only what follows it [G, Lp - S], left-padded (the
  bucket's width, not the sampler's trimmed one: a width per step would multiply the compiled
  (width, row count) pairs): the update runs the prefix once a step rather than once a group."""
  rows = len(roll.finish_reasons)
  m = group_size(roll.n, micro_batch, sharding.data_parallel_size(mesh))
  lc = roll.completion_ids.shape[1]
  batch = {"prompt": roll.prompt_ids[:rows:m], "prompt_mask": roll.prompt_mask[:rows:m] > 0,
           "completion": roll.completion_ids[:rows].reshape(-1, m, lc),
           "completion_mask": roll.completion_mask[:rows].reshape(-1, m, lc) > 0}

  def as_device(v):
    return place(np.asarray(v, np.int32 if v.dtype.kind in "iu" else bool), mesh)

  prefix = None
  if pack and shared_prefix_min > 0:
    from cqr_jax.sampler import shared_prefix_layout
    ids, mask, s = shared_prefix_layout(batch["prompt"], batch["prompt_mask"],
                                        len(batch["prompt"]), shared_prefix_min, 0,
                                        trim=False)
    if s:
      prefix, batch["prompt"], batch["prompt_mask"] = ids[0, :s], ids[:, s:], mask[:, s:]
  out = {k: as_device(v) for k, v in batch.items()}
  if prefix is not None:
    out["prefix"] = place_replicated(prefix.astype(np.int32), mesh)
  if pack:
    out["packs"] = [{k: as_device(v) for k, v in pack_groups(batch["completion"][g],
                                                             batch["completion_mask"][g]).items()}
                    for g in micro_groups(len(batch["completion"]), m, micro_batch)]
  return out


def num_micro(groups: int, m: int, micro_batch: int) -> int:
  """Micro-batches of a grouped batch of `groups` x m completions: `micro_batch` completions
  each, whole groups."""
  if micro_batch % m or (groups * m) % micro_batch:
    raise ValueError(f"a grouped batch of {groups} x {m} completions cannot be cut into "
                     f"micro-batches of {micro_batch} (see rollout_batch.group_size)")
  return max(groups * m // micro_batch, 1)


def micro_groups(groups: int, m: int, micro_batch: int) -> list[np.ndarray]:
  """The groups of each micro-batch: micro-batch i holds groups i, i + M, i + 2M, ... (strided,
  as train.steps splits a batch: a batch sharded over the data devices in contiguous blocks then
  keeps every micro-batch spread over all devices)."""
  n = num_micro(groups, m, micro_batch)
  return [np.arange(i, groups, n) for i in range(n)]


def pack_groups(completion_gmc: np.ndarray, mask_gmc: np.ndarray) -> dict[str, np.ndarray]:
  """Each group's m completions (their masked tokens, a prefix of each row) laid end to end in
  k rows of Lc slots, k = ceil(longest group's token count / Lc), the same k for every group
  (one micro-batch's groups: the update compiles once per k): `Decoder.packed_completion_logprobs`'
  inputs.

  Returns packed [G, k, Lc] (tokens, 0 in empty slots), packed_segment [G, k, Lc] (the
  completion 0..m-1 a slot holds, -1 if empty), packed_offset [G, k, Lc] (the token's index in
  its completion) and packed_unpack [G, m, Lc] (slot of completion j's token t in the group's
  k * Lc slots; 0 past its end)."""
  g, m, lc = completion_gmc.shape
  lengths_gm = mask_gmc.sum(-1)
  if np.any(mask_gmc != (np.arange(lc) < lengths_gm[..., None])):
    raise ValueError("pack_groups: every completion_mask row must be a prefix of ones")
  k = max(1, -(-int(lengths_gm.sum(-1).max()) // lc))
  tokens = np.zeros((g, k * lc), np.int32)
  segment = np.full((g, k * lc), -1, np.int32)
  offset = np.zeros((g, k * lc), np.int32)
  unpack = np.zeros((g, m, lc), np.int32)
  starts_gm = np.cumsum(lengths_gm, axis=-1) - lengths_gm
  for i in range(g):
    for j in range(m):
      n, s = int(lengths_gm[i, j]), int(starts_gm[i, j])
      tokens[i, s:s + n] = completion_gmc[i, j, :n]
      segment[i, s:s + n] = j
      offset[i, s:s + n] = np.arange(n)
      unpack[i, j, :n] = np.arange(s, s + n)
  shape = (g, k, lc)
  return {"packed": tokens.reshape(shape), "packed_segment": segment.reshape(shape),
          "packed_offset": offset.reshape(shape), "packed_unpack": unpack}


def pad_left(seqs: list[list[int]], length: int, pad_id: int) -> np.ndarray:
  """[B, length] with each sequence at the end of its row (longer ones keep their last tokens)."""
  out = np.full((len(seqs), length), pad_id, np.int32)
  for i, s in enumerate(seqs):
    s = s[-length:]
    out[i, length - len(s):] = s
  return out


def bucket_length(n: int, multiple: int = 64) -> int:
  return max(multiple, -(-n // multiple) * multiple)
