"""The SFT objective and batch building (method.md 3.3-3.4).

A training example is `prompt_ids ++ response_ids ++ [eos]` (the prompt already templated with the
generation prompt), right-padded. The loss is token cross-entropy on the response tokens and the
EOS only; prompt and padding are masked.

Micro-batching: `sft_loss` returns (sum, count). verl's SFT (method.md 3.4) takes each micro-batch's
sum / count and averages over ranks (mean of micro-batch means); the exact global token mean is
Σ sums / Σ counts. Both are available through `grpo.combine_microbatches` semantics: use
aggregation "token_mean" for the former and "token_sum_global" for the latter.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def sft_loss(logp_bt: jax.Array, loss_mask_bt: jax.Array):
  """(Σ −log p over masked tokens, number of masked tokens) for one micro-batch."""
  mask_bt = jnp.asarray(loss_mask_bt).astype(jnp.float32)
  if mask_bt.shape != logp_bt.shape:
    raise ValueError(f"sft_loss: logp_bt {logp_bt.shape} != loss_mask_bt {mask_bt.shape}")
  return -jnp.sum(logp_bt.astype(jnp.float32) * mask_bt), jnp.sum(mask_bt)


@dataclasses.dataclass
class SFTBatch:
  """Right-padded next-token batch, all [B, T] numpy arrays with T = max_len.

  input_ids[t] predicts target_ids[t] (= input_ids[t+1]); loss_mask[t] = 1 when that target is a
  response token or the EOS. attention_mask marks real input tokens; positions count from 0.
  """

  input_ids: np.ndarray
  target_ids: np.ndarray
  loss_mask: np.ndarray
  attention_mask: np.ndarray
  positions: np.ndarray


def sft_targets(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                eos_id: int, max_len: int, pad_id: int = 0,
                truncation: str = "error") -> SFTBatch:
  """Builds an SFTBatch from token lists (method.md 3.3).

  Each sequence is prompt ++ response ++ [eos], at most max_len tokens, as verl's SFT dataset
  builds it: input_ids holds the whole sequence, target_ids the same shifted left by one (the last
  input has no target). truncation="error" (the TopiOCQA script) raises on a longer example naming
  it; "right" (the QReCC script) cuts it on the right.
  """
  if len(prompt_ids) != len(response_ids):
    raise ValueError(f"sft_targets: {len(prompt_ids)} prompts but {len(response_ids)} responses")
  if truncation not in ("error", "right"):
    raise ValueError(f"sft_targets: truncation must be 'error' or 'right', got {truncation!r}")
  b = len(prompt_ids)
  input_ids = np.full((b, max_len), pad_id, np.int32)
  target_ids = np.full((b, max_len), pad_id, np.int32)
  loss_mask = np.zeros((b, max_len), np.int32)
  attention_mask = np.zeros((b, max_len), np.int32)
  for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
    if len(p) == 0:
      raise ValueError(f"sft_targets: example {i} has an empty prompt")
    seq = [int(t) for t in p] + [int(t) for t in r] + [eos_id]
    is_resp = [0] * len(p) + [1] * (len(r) + 1)
    if len(seq) > max_len:
      if truncation == "error":
        raise ValueError(f"sft_targets: example {i} has {len(seq)} tokens (prompt {len(p)}, "
                         f"response {len(r)} + eos) > max_len = {max_len}; raise max_len "
                         "or use truncation='right'")
      seq, is_resp = seq[:max_len], is_resp[:max_len]
    n = len(seq)
    input_ids[i, :n] = seq
    target_ids[i, :n - 1] = seq[1:]
    loss_mask[i, :n - 1] = is_resp[1:]
    attention_mask[i, :n] = 1
  positions = np.broadcast_to(np.arange(max_len, dtype=np.int32), (b, max_len)).copy()
  return SFTBatch(input_ids, target_ids, loss_mask, attention_mask, positions)
