"""The tokens every row of a call starts with (a template's instructions), run through the model
once instead of once per row: by the sampler's prompt pass, the GRPO update and reference pass,
and the SFT update. One setting, `model.shared_prefix_min` (RunConfig), turns it on for all three.

A shared prefix's length is rounded down to a multiple of `MULTIPLE`, so that a run compiles few
shapes, and is used only when it reaches `min_tokens` (> 0). The model then attends to the
prefix's keys from every row in the same softmax as the row's own (`Decoder.prefix_kv` and the
`common` argument of its forward passes): the same outputs as running it in each row.
Measured in bench/results/sampler.md and bench/results/sft_update_prefix.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MULTIPLE = 16


def common_length(rows: Sequence[Sequence[int]], cap: int, min_tokens: int) -> int:
  """The length S of the prefix all `rows` share, at most `cap`, rounded down to a multiple of
  MULTIPLE; 0 if that is under `min_tokens`, if `min_tokens` <= 0 or with fewer than two rows."""
  if min_tokens <= 0 or len(rows) < 2 or cap < min_tokens:
    return 0
  first = np.asarray(rows[0][:cap])
  common = len(first)
  for row in rows[1:]:
    n = min(common, len(row))
    same = np.asarray(row[:n]) == first[:n]
    common = n if same.all() else int(np.argmin(same))
  s = common // MULTIPLE * MULTIPLE
  return s if s >= min_tokens else 0


def split_prompts(ids_bp: np.ndarray, mask_bp: np.ndarray, num_prompts: int, min_tokens: int,
                  pad_id: int):
  """Left-padded prompts [B, P] (the first `num_prompts` real) laid out for a pass that runs
  their shared prefix once: returns ([B, P] ids, mask, S), every row's first S columns holding
  the prefix (valid, in padding rows too) and the other P - S each prompt's remaining tokens,
  left-padded. S leaves every prompt at least one token of its own. One width per prompt bucket:
  a width fitted to each call's longest remainder would compile a program per width, which
  costs a short run more than the padding it saves. Without a prefix: (ids_bp, mask_bp, 0)."""
  rows = [ids_bp[i][mask_bp[i]] for i in range(num_prompts)]
  s = common_length(rows, min(len(r) for r in rows) - 1, min_tokens)
  if s == 0:
    return ids_bp, mask_bp, 0
  width = ids_bp.shape[1]
  ids = np.full((ids_bp.shape[0], width), pad_id, ids_bp.dtype)
  mask = np.zeros((ids_bp.shape[0], width), bool)
  ids[:, :s], mask[:, :s] = rows[0][:s], True
  for i, r in enumerate(rows):
    ids[i, width - (len(r) - s):], mask[i, width - (len(r) - s):] = r[s:], True
  return ids, mask, s


def for_examples(examples, min_tokens: int) -> int:
  """S for SFT examples (token ids, loss mask) pairs: their shared prefix, cut before the input
  of every example's first loss target (a row's first token predicts nothing)."""
  if len(examples) < 2:
    return 0
  cap = min(lm.index(1) if 1 in lm else len(lm) for _, lm in examples) - 1
  return common_length([ids for ids, _ in examples], cap, min_tokens)
