"""The Hugging Face <-> cqr_jax parameter name map for the Qwen2 / Llama decoder (one place).

HF tensor [shape] -> ours [shape] (transform):
  model.embed_tokens.weight [V, D]                -> embed.embedding [V, D]           (identity)
  model.layers.{i}.input_layernorm.weight [D]     -> layers.{i}.attn_norm.scale [D]   (identity)
  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight [out, in]
                                                  -> layers.{i}.attn.{q,k,v,o}_proj.kernel [in, out]
                                                                                      (transpose)
  model.layers.{i}.self_attn.{q,k,v}_proj.bias    -> layers.{i}.attn.{q,k,v}_proj.bias (Qwen2 only)
  model.layers.{i}.post_attention_layernorm.weight -> layers.{i}.mlp_norm.scale [D]   (identity)
  model.layers.{i}.mlp.{gate,up,down}_proj.weight [out, in]
                                                  -> layers.{i}.mlp.{gate,up,down}_proj.kernel
                                                     [in, out]                        (transpose)
  model.norm.weight [D]                           -> final_norm.scale [D]             (identity)
  lm_head.weight [V, D] (untied only)             -> lm_head.embedding [V, D]         (identity)

Both transforms are their own inverse, so `apply_transform` converts in either direction.
With tied embeddings HF files may still carry `lm_head.weight` (a copy of the embedding):
`IGNORED_WHEN_TIED` lists it; `params_to_hf` omits it.
"""

from __future__ import annotations

import re
from typing import Iterator

import jax
import numpy as np
from flax import nnx

from cqr_jax.models.config import ModelConfig

Path = tuple  # e.g. ("layers", 3, "attn", "q_proj", "kernel")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_MAP = {  # HF suffix -> (our sub-path, transform)
    "input_layernorm.weight": (("attn_norm", "scale"), "identity"),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), "identity"),
    **{f"self_attn.{p}_proj.weight": (("attn", f"{p}_proj", "kernel"), "transpose")
       for p in "qkvo"},
    **{f"self_attn.{p}_proj.bias": (("attn", f"{p}_proj", "bias"), "identity") for p in "qkv"},
    **{f"mlp.{p}_proj.weight": (("mlp", f"{p}_proj", "kernel"), "transpose")
       for p in ("gate", "up", "down")},
}
_TOP_MAP = {
    "model.embed_tokens.weight": (("embed", "embedding"), "identity"),
    "model.norm.weight": (("final_norm", "scale"), "identity"),
    "lm_head.weight": (("lm_head", "embedding"), "identity"),
}
# Buffers some checkpoints carry that are not parameters.
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
IGNORED_WHEN_TIED = ("lm_head.weight",)


class HFNameError(KeyError):
  """A tensor name that is not part of the Qwen2/Llama decoder."""

  def __str__(self):
    return str(self.args[0])


def hf_to_ours(name: str) -> tuple[Path, str]:
  """HF tensor name -> (our parameter path, transform "identity" | "transpose")."""
  if name in _TOP_MAP:
    return _TOP_MAP[name]
  m = _LAYER.match(name)
  if m and m.group(2) in _LAYER_MAP:
    sub, transform = _LAYER_MAP[m.group(2)]
    return ("layers", int(m.group(1)), *sub), transform
  raise HFNameError(f"unexpected tensor {name!r}: not a Qwen2/Llama decoder parameter (expected "
                    f"model.embed_tokens.weight, model.layers.<i>.<{'|'.join(_LAYER_MAP)}>, "
                    f"model.norm.weight or lm_head.weight)")


def ours_to_hf(path: Path) -> tuple[str, str]:
  """Our parameter path -> (HF tensor name, transform)."""
  path = tuple(path)
  for name, (p, tr) in _TOP_MAP.items():
    if p == path:
      return name, tr
  if len(path) > 2 and path[0] == "layers":
    for suffix, (sub, tr) in _LAYER_MAP.items():
      if tuple(path[2:]) == sub:
        return f"model.layers.{int(path[1])}.{suffix}", tr
  raise HFNameError(f"parameter {'.'.join(map(str, path))!r} has no HF name")


def apply_transform(x: np.ndarray, transform: str) -> np.ndarray:
  """Applies (or, equally, undoes) a name-map transform."""
  if transform == "identity":
    return x
  if transform == "transpose":
    return x.T
  raise ValueError(f"unknown transform {transform!r}; expected 'identity' or 'transpose'")


def hf_names(config: ModelConfig) -> list[str]:
  """Every HF tensor name of this architecture, in HF's order (lm_head last, untied only)."""
  names = ["model.embed_tokens.weight"]
  for i in range(config.num_layers):
    pre = f"model.layers.{i}."
    names.append(pre + "input_layernorm.weight")
    for p in "qkv":
      names.append(pre + f"self_attn.{p}_proj.weight")
      if config.qkv_bias:
        names.append(pre + f"self_attn.{p}_proj.bias")
    names.append(pre + "self_attn.o_proj.weight")
    names.append(pre + "post_attention_layernorm.weight")
    names += [pre + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
  names.append("model.norm.weight")
  if not config.tie_word_embeddings:
    names.append("lm_head.weight")
  return names


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def params_to_hf(model_state, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, numpy array in HF layout) one tensor at a time, in `hf_names` order.

  `model_state` is a Decoder or its `nnx.State`. Arrays keep the parameter dtype (bf16 comes as
  ml_dtypes.bfloat16); sharded arrays are gathered (across processes if needed) per tensor.
  Tied models omit lm_head.weight.
  """
  if isinstance(model_state, nnx.Module):
    model_state = nnx.state(model_state, nnx.Param)
  flat = {tuple(p): v for p, v in nnx.to_flat_state(model_state)}
  for name in hf_names(config):
    path, transform = hf_to_ours(name)
    if path not in flat:
      raise HFNameError(f"model state has no parameter {'.'.join(map(str, path))!r} "
                        f"(needed for HF tensor {name!r})")
    v = flat[path]
    arr = v[...] if isinstance(v, nnx.Variable) else v
    yield name, np.ascontiguousarray(apply_transform(_to_host(arr), transform))
