"""Rollouts (or SFT examples) -> the padded training batch that `train.steps` consumes."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def place(x: np.ndarray, mesh) -> jax.Array:
  """Puts a host array on the mesh with its leading (batch) axis over data x fsdp."""
  if mesh is None:
    return jax.device_put(x)
  spec = P(("data", "fsdp"), *([None] * (x.ndim - 1)))
  return jax.device_put(x, NamedSharding(mesh, spec))


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
