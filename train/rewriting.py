"""Rewriting turns with a policy in batches: the shared inner loop of SDPW and evaluation.

The official code samples SDPW candidates and evaluation rewrites with vLLM and no prompt cap
(method.md 3.1, 5.1), so these stages never drop or cut a prompt: `inference_prompt_len` grows the
sampler's largest prompt bucket from rollout.max_prompt_len to the longest prompt of the split.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Iterator, Sequence

import jax
import numpy as np

from cqr_jax.parsing import ParsedResponse, parse_response

log = logging.getLogger("cqr_jax")


@dataclasses.dataclass
class Rewrite:
  turn_index: int
  sample: int
  text: str
  parsed: ParsedResponse
  finish_reason: str
  num_tokens: int


def make_sampler(cfg, tokenizer, mesh, mcfg, *, n: int, temperature: float, max_new_tokens: int,
                 max_prompt_len: int | None = None, batch_prompts: int | None = None,
                 prompt_buckets: Sequence[int] = ()):
  """The stage's sampler; `max_prompt_len` (e.g. `inference_prompt_len`) replaces
  rollout.max_prompt_len, and `prompt_buckets` (when not empty) rollout.prompt_buckets.
  `batch_prompts`: a stage's prompts per call; a last, partial batch is padded to it, so the
  stage compiles one program per prompt bucket."""
  from cqr_jax.sampler import Sampler, SamplerConfig
  ro = cfg.rollout
  return Sampler(SamplerConfig(
      max_prompt_len=max_prompt_len or ro.max_prompt_len, max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_p=ro.top_p, top_k=ro.top_k, n=n, truncate_prompt_left=ro.truncate_prompt_left,
      prompt_len_buckets=tuple(prompt_buckets or ro.prompt_buckets), compute_dtype=ro.compute_dtype,
      shared_prefix_min=cfg.model.shared_prefix_min,
      batch_buckets=(batch_prompts,) if batch_prompts else ()),
      tokenizer, mesh=mesh, model_eos_ids=mcfg.eos_token_ids)


def inference_prompt_len(cfg, prompts, tokenizer, turns: Sequence,
                         response_prefix: str = "") -> int:
  """rollout.max_prompt_len, or the longest prompt of `turns` (with the response prefix) when
  that is longer: no inference prompt is dropped or cut (module docstring)."""
  extra = (len(tokenizer(response_prefix, add_special_tokens=False)["input_ids"])
           if response_prefix else 0)
  lengths = [len(prompts.token_ids(t, tokenizer)) + extra for t in turns]
  cap = cfg.rollout.max_prompt_len
  over = sum(n > cap for n in lengths)
  if over:
    log.info("%d of %d prompts are longer than rollout.max_prompt_len=%d: the sampler's largest "
             "bucket grows to %d tokens (no prompt cap at inference)", over, len(lengths), cap,
             max(lengths))
  return max([cap] + lengths)


def rewrite_batches(model, sampler, tokenizer, prompts, turns: Sequence, *, key: jax.Array,
                    n: int, batch_prompts: int, temperature: float, desc: str = "rewrite",
                    start: int = 0, response_prefix: str = ""
                    ) -> Iterator[tuple[int, list[Rewrite], dict]]:
  """Yields (end index, rewrites of turns[start:end], timing) batch by batch, with a progress bar.

  Batch b uses key fold_in(key, b), so a resumed run reproduces the samples it would have drawn.
  `response_prefix` is appended to every prompt as the start of the response and prepended to
  the decoded texts, so parsing sees the whole response.
  """
  prefix_ids = (tokenizer(response_prefix, add_special_tokens=False)["input_ids"]
                if response_prefix else [])
  from tqdm.auto import tqdm
  bar = tqdm(total=len(turns), initial=start, desc=desc, disable=jax.process_index() != 0)
  for b0 in range(start, len(turns), batch_prompts):
    chunk = turns[b0:b0 + batch_prompts]
    ids = [prompts.token_ids(t, tokenizer) + prefix_ids for t in chunk]
    t0 = time.perf_counter()
    try:
      roll = sampler.generate(model, ids, key=jax.random.fold_in(key, b0 // batch_prompts), n=n,
                              temperature=temperature)
    except ValueError as e:  # name the turn, not the batch row
      m = re.match(r"prompts\[(\d+)\]", str(e))
      if m is None or int(m.group(1)) >= len(chunk):
        raise
      raise ValueError(f"turn {chunk[int(m.group(1))].qid!r}: {e}") from e
    secs = time.perf_counter() - t0
    lengths = roll.completion_lengths
    texts = [response_prefix + t for t in roll.texts]
    out = [Rewrite(turn_index=b0 + int(i) // n, sample=int(i) % n, text=texts[i],
                   parsed=parse_response(texts[i]), finish_reason=roll.finish_reasons[i],
                   num_tokens=int(lengths[i])) for i in range(len(roll.texts))]
    bar.update(len(chunk))
    yield b0 + len(chunk), out, {"seconds": secs, "tokens": int(np.sum(lengths))}
  bar.close()
