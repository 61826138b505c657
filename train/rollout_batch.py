"""Rollouts (or SFT examples) -> the padded training batches that `train.steps` consumes."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cqr_jax import sharding


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


def assemble(roll, mesh, micro_batch: int, pack: bool = False,
             shared_prefix_min: int = 0) -> dict:
  """The grouped GRPO batch (train.steps.make_grpo_update) of rollouts with n samples a prompt:
  the n samples of a prompt are split into groups of m = `group_size(...)`, each group one row:
  prompt, prompt_mask [G, Lp] (left-padded); completion, completion_mask [G, m, Lc], the mask
  marking response tokens up to and including the first EOS (method.md 4.5). G = rows / m; the
  group of row-major rollout r is r // m (so reshape per-rollout values [rows] to [G, m]).
  With `pack`, also "packs": per micro-batch (`micro_groups`), each of its groups' prompt and
  completions packed end to end (`pack_groups`) in as many rows as that micro-batch needs; the
  model then runs over those slots instead of the left-padded prompt and m padded rows, one
  compiled shape per row count. With `pack` and
  `shared_prefix_min` > 0, when the prompts share a prefix of at least that many tokens
  (`cqr_jax.sampler.shared_prefix_layout`: rounded down to a multiple of 16), also "prefix" [S]
  (replicated), and the prompts hold only what follows it [G, Lp - S], left-padded: the update
  runs the prefix once a step rather than once a group."""
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
                                        len(batch["prompt"]), shared_prefix_min, 0)
    if s:
      prefix, batch["prompt"], batch["prompt_mask"] = ids[0, :s], ids[:, s:], mask[:, s:]
  out = {k: as_device(v) for k, v in batch.items()}
  if prefix is not None:
    out["prefix"] = place_replicated(prefix.astype(np.int32), mesh)
  if pack:
    parts = ("prompt", "prompt_mask", "completion", "completion_mask")
    out["packs"] = [{k: as_device(v) for k, v in pack_groups(*(batch[p][g] for p in parts)).items()}
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


# Packed rows per group come in multiples of this (at most the unpacked layout's count): a run
# compiles its update and reference pass for a few row counts, not one per count the data gives
# (the pipeline's wall time: bench/results/cpu_default_recipe.md).
PACK_ROW_MULTIPLE = 4


def pack_groups(prompt_gp: np.ndarray, prompt_mask_gp: np.ndarray, completion_gmc: np.ndarray,
                mask_gmc: np.ndarray) -> dict[str, np.ndarray]:
  """Each group's prompt (its real tokens) then its m completions (their masked tokens, a prefix
  of each row) laid end to end in k rows of Lc slots, k = ceil(the longest group's token count /
  Lc) rounded up to a multiple of PACK_ROW_MULTIPLE (at most ceil((Lp + m * Lc) / Lc)), the same
  k for every group (one micro-batch's groups: the update and the reference pass compile once
  per k): `Decoder.packed_completion_logprobs`' inputs. Only the tail is empty: the prompt's
  left padding and the completions' right padding are gone.

  Returns packed [G, k, Lc] (tokens, 0 in empty slots); packed_segment [G, k, Lc] (the
  completion 0..m-1 a slot holds, m for the prompt, -1 if empty); packed_position [G, k, Lc]
  (0, 1, .. through the prompt, then prompt length + the token's index in its completion);
  packed_source [G, k, Lc] (the slot whose output predicts the slot's token: the prompt's last
  for a completion's first token, else the slot before); packed_unpack [G, m, Lc] (slot of
  completion j's token t in the group's k * Lc slots; 0 past its end)."""
  g, m, lc = completion_gmc.shape
  lengths_gm = mask_gmc.sum(-1)
  if np.any(mask_gmc != (np.arange(lc) < lengths_gm[..., None])):
    raise ValueError("pack_groups: every completion_mask row must be a prefix of ones")
  prompts = [row[mask] for row, mask in zip(prompt_gp, np.asarray(prompt_mask_gp, bool))]
  if min(len(r) for r in prompts) == 0:
    raise ValueError("pack_groups: every group needs at least one real prompt token")
  longest = max(len(r) + int(n) for r, n in zip(prompts, lengths_gm.sum(-1)))
  k = -(-max(longest, 1) // lc)
  k_max = -(-(prompt_gp.shape[1] + m * lc) // lc)
  slots = min(-(-k // PACK_ROW_MULTIPLE) * PACK_ROW_MULTIPLE, k_max) * lc
  tokens = np.zeros((g, slots), np.int32)
  segment = np.full((g, slots), -1, np.int32)
  position = np.zeros((g, slots), np.int32)
  source = np.zeros((g, slots), np.int32)
  unpack = np.zeros((g, m, lc), np.int32)
  for i, prompt in enumerate(prompts):
    lp = len(prompt)
    tokens[i, :lp], segment[i, :lp], position[i, :lp] = prompt, m, np.arange(lp)
    source[i, 1:lp] = np.arange(lp - 1)
    start = lp
    for j in range(m):
      span = np.arange(start, start + int(lengths_gm[i, j]))
      tokens[i, span], segment[i, span] = completion_gmc[i, j, :len(span)], j
      position[i, span] = lp + np.arange(len(span))
      source[i, span] = np.concatenate([[lp - 1], span[:-1]])
      unpack[i, j, :len(span)] = span
      start += len(span)
  shape = (g, slots // lc, lc)
  return {"packed": tokens.reshape(shape), "packed_segment": segment.reshape(shape),
          "packed_position": position.reshape(shape), "packed_source": source.reshape(shape),
          "packed_unpack": unpack}


def pad_left(seqs: list[list[int]], length: int, pad_id: int) -> np.ndarray:
  """[B, length] with each sequence at the end of its row (longer ones keep their last tokens)."""
  out = np.full((len(seqs), length), pad_id, np.int32)
  for i, s in enumerate(seqs):
    s = s[-length:]
    out[i, length - len(s):] = s
  return out


def bucket_length(n: int, multiple: int = 64) -> int:
  return max(multiple, -(-n // multiple) * multiple)
