"""Rollouts (or SFT examples) -> the padded training batch that `train.steps` consumes."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cqr_jax import distributed


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


def assemble(roll, mesh) -> dict:
  """tokens [N, P+G] = left-padded prompt ++ completion; mask marks real tokens; loss_mask marks
  response tokens up to and including the first EOS (method.md 4.5)."""
  tokens = np.concatenate([roll.prompt_ids, roll.completion_ids], axis=1).astype(np.int32)
  comp = roll.completion_mask.astype(bool)
  mask = np.concatenate([roll.prompt_mask.astype(bool), comp], axis=1)
  loss_mask = np.concatenate([np.zeros_like(roll.prompt_mask, bool), comp], axis=1)
  n = len(roll.finish_reasons)
  return {"tokens": place(tokens[:n], mesh), "mask": place(mask[:n], mesh),
          "loss_mask": place(loss_mask[:n], mesh)}


def pad_right(seqs: list[list[int]], length: int, pad_id: int) -> np.ndarray:
  out = np.full((len(seqs), length), pad_id, np.int32)
  for i, s in enumerate(seqs):
    out[i, :len(s)] = s[:length]
  return out


def bucket_length(n: int, multiple: int = 64) -> int:
  return max(multiple, -(-n // multiple) * multiple)
