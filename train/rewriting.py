"""Rewriting turns with a policy in batches: the shared inner loop of SDPW and evaluation."""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Sequence

import jax
import numpy as np

from cqr_jax.parsing import ParsedResponse, parse_response


@dataclasses.dataclass
class Rewrite:
  turn_index: int
  sample: int
  text: str
  parsed: ParsedResponse
  finish_reason: str
  num_tokens: int


def make_sampler(cfg, tokenizer, mesh, mcfg, *, n: int, temperature: float, max_new_tokens: int):
  from cqr_jax.sampler import Sampler, SamplerConfig
  ro = cfg.rollout
  return Sampler(SamplerConfig(
      max_prompt_len=ro.max_prompt_len, max_new_tokens=max_new_tokens, temperature=temperature,
      top_p=ro.top_p, top_k=ro.top_k, n=n, truncate_prompt_left=ro.truncate_prompt_left,
      prompt_len_buckets=tuple(ro.prompt_buckets), compute_dtype=ro.compute_dtype,
      shared_prefix_min=ro.shared_prefix_min),
      tokenizer, mesh=mesh, model_eos_ids=mcfg.eos_token_ids)


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
    roll = sampler.generate(model, ids, key=jax.random.fold_in(key, b0 // batch_prompts), n=n,
                            temperature=temperature)
    secs = time.perf_counter() - t0
    lengths = roll.completion_lengths
    texts = [response_prefix + t for t in roll.texts]
    out = [Rewrite(turn_index=b0 + int(i) // n, sample=int(i) % n, text=texts[i],
                   parsed=parse_response(texts[i]), finish_reason=roll.finish_reasons[i],
                   num_tokens=int(lengths[i])) for i in range(len(roll.texts))]
    bar.update(len(chunk))
    yield b0 + len(chunk), out, {"seconds": secs, "tokens": int(np.sum(lengths))}
  bar.close()
