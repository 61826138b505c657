"""Tiny random transformers (PyTorch) Qwen2 / Llama models, saved as HF folders, for parity tests
and benchmarks. Needs the `test` extra (torch); never used by the training path.
"""

from __future__ import annotations

import os

import numpy as np

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def tiny_hf_config(family: str = "qwen2", **kw):
  """A transformers Qwen2Config / LlamaConfig with tiny defaults (GQA 4 heads / 2 KV heads)."""
  from transformers import LlamaConfig, Qwen2Config
  base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
  base.update(kw)
  if family == "qwen2":
    return Qwen2Config(**base)
  if family == "llama":
    return LlamaConfig(**base)
  raise ValueError(f"family={family!r}: expected 'qwen2' or 'llama'")


def tiny_hf_model(family: str = "qwen2", seed: int = 0, **kw):
  """A random model in eval mode whose every parameter (biases and norm scales included) is
  random, so parity tests exercise each tensor."""
  import torch
  from transformers import LlamaForCausalLM, Qwen2ForCausalLM
  cfg = tiny_hf_config(family, **kw)
  torch.manual_seed(seed)
  model = (Qwen2ForCausalLM if family == "qwen2" else LlamaForCausalLM)(cfg).float().eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.1
      p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
  return model


def save_tiny_hf(path: str | os.PathLike, family: str = "qwen2", seed: int = 0,
                 max_shard_size: str | None = None, **kw):
  """Saves a tiny random model (safetensors, optionally sharded) to `path`; returns the model."""
  model = tiny_hf_model(family, seed, **kw)
  extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(os.fspath(path), **extra)
  return model


def hf_logits(model, tokens_bt, positions_bt, mask_bt) -> np.ndarray:
  """float32 logits [B, T, V] of a transformers model with explicit positions and mask."""
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(np.asarray(tokens_bt), dtype=torch.long),
                attention_mask=torch.as_tensor(np.asarray(mask_bt), dtype=torch.long),
                position_ids=torch.as_tensor(np.asarray(positions_bt), dtype=torch.long))
  return out.logits.float().numpy()


def padded_batch(rng: np.random.Generator, vocab: int, batch: int, length: int, side: str):
  """Random tokens with per-row lengths, padded on `side` ("left" | "right").
  Returns (tokens, positions, mask) int32 [B, T]; positions start at 0 at the first real token."""
  lengths = rng.integers(max(1, length // 2), length + 1, size=batch)
  lengths[0] = length
  tokens = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
  mask = np.zeros((batch, length), np.int32)
  for b, n in enumerate(lengths):
    if side == "left":
      mask[b, length - n:] = 1
    else:
      mask[b, :n] = 1
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, positions, mask
