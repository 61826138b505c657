"""Load a Hugging Face Qwen2 / Llama checkpoint (local folder) into the (sharded) NNX Decoder.

Tensors stream one at a time from single or sharded safetensors (`model.safetensors.index.json`):
each is transposed if needed, cast to the parameter dtype and placed straight into its shards
(`jax.make_array_from_callback`), so host memory holds the model once plus one tensor.
`load_from_hf_tensors` takes any iterator of (HF name, numpy array), e.g. the GGUF reader's.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterable, Iterator

import jax
import numpy as np
from flax import nnx

from cqr_jax.models.config import ModelConfig
from cqr_jax.models.decoder import Decoder
from cqr_jax.models.hf_names import (IGNORED, IGNORED_WHEN_TIED, HFNameError, apply_transform,
                                     hf_to_ours, ours_to_hf)
from cqr_jax.models.layers import dtype_of

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
  """A checkpoint that does not fit the configured architecture (names the tensor)."""


def safetensors_files(path: str | os.PathLike) -> list[str]:
  """The folder's safetensors files: from the index if sharded, else model.safetensors."""
  path = os.fspath(path)
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not weight_map:
      raise CheckpointError(f"{index}: no 'weight_map' field")
    files = sorted(set(weight_map.values()))
    for name in files:
      if not os.path.exists(os.path.join(path, name)):
        raise CheckpointError(f"{index} lists {name!r}, which is not in {path}")
    return [os.path.join(path, n) for n in files]
  single = os.path.join(path, SINGLE_FILE)
  if os.path.exists(single):
    return [single]
  raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def iter_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
  """(name, numpy array) for every tensor of the folder, one at a time."""
  from safetensors import safe_open
  for file in safetensors_files(path):
    with safe_open(file, framework="np") as f:
      for name in f.keys():
        yield name, f.get_tensor(name)


def load_from_hf_tensors(config: ModelConfig, named_tensors: Iterable[tuple[str, np.ndarray]], *,
                         mesh=None, strict: bool = True, source: str = "checkpoint") -> Decoder:
  """Builds a Decoder for `config` from HF-named tensors, placing each into its sharding.

  Errors (CheckpointError naming the tensor and what was expected): an unexpected tensor (only
  logged when strict=False), a tensor given twice, a shape mismatch, and missing tensors.
  """
  from cqr_jax.sharding import MeshConfig, abstract_model, make_mesh, state_shardings
  if mesh is None:
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  graphdef, abstract = nnx.split(abstract_model(config))
  shardings = {tuple(p): v.get_value()
               for p, v in nnx.to_flat_state(state_shardings(abstract, mesh))}
  expected = {tuple(p): v for p, v in nnx.to_flat_state(abstract)}
  dtype = dtype_of(config.param_dtype)
  filled: dict[tuple, jax.Array] = {}
  for name, arr in named_tensors:
    if IGNORED.search(name) or (config.tie_word_embeddings and name in IGNORED_WHEN_TIED):
      continue
    try:
      path, transform = hf_to_ours(name)
    except HFNameError as e:
      _unexpected(f"{source}: {e}", strict)
      continue
    if path not in expected:
      _unexpected(f"{source}: unexpected tensor {name!r}: the configured {config.family} model "
                  f"(num_layers={config.num_layers}, qkv_bias={config.qkv_bias}, "
                  f"tie_word_embeddings={config.tie_word_embeddings}) has no such parameter",
                  strict)
      continue
    if path in filled:
      raise CheckpointError(f"{source}: tensor {name!r} appears twice")
    want = tuple(expected[path].shape)
    want_hf = tuple(apply_transform(np.empty(want, np.int8), transform).shape)
    arr = np.asarray(arr)
    if tuple(arr.shape) != want_hf:
      raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, expected "
                            f"{want_hf} for the configured architecture")
    x = apply_transform(arr, transform).astype(dtype, copy=False)
    filled[path] = jax.make_array_from_callback(
        want, shardings[path], lambda idx, x=x: np.ascontiguousarray(x[idx]))
    del arr, x
  missing = [ours_to_hf(p)[0] for p in expected if p not in filled]
  if missing:
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    raise CheckpointError(f"{source}: missing tensor(s) {shown} (expected by the configured "
                          f"{config.family} model)")
  state = nnx.from_flat_state([(p, v.replace(filled[p])) for p, v in expected.items()])
  return nnx.merge(graphdef, state)


def _unexpected(msg: str, strict: bool):
  if strict:
    raise CheckpointError(msg)
  log.warning("skipped: %s", msg)


def load_hf(path: str | os.PathLike, *, mesh=None, param_dtype: str | None = None,
            compute_dtype: str | None = None, strict: bool = True,
            **config_overrides) -> tuple[Decoder, ModelConfig]:
  """Loads config.json + safetensors from a local HF folder into a (sharded) Decoder.

  param_dtype defaults to float32 (master weights), compute_dtype to float32; other
  ModelConfig fields (e.g. remat) may be overridden by keyword.
  """
  overrides = dict(config_overrides)
  if param_dtype:
    overrides["param_dtype"] = param_dtype
  if compute_dtype:
    overrides["compute_dtype"] = compute_dtype
  config = ModelConfig.from_hf_config(path, **overrides)
  model = load_from_hf_tensors(config, iter_safetensors(path), mesh=mesh, strict=strict,
                               source=os.fspath(path))
  return model, config


def load_tokenizer(path: str | os.PathLike):
  """The folder's tokenizer (with its chat template) via transformers' AutoTokenizer."""
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(os.fspath(path))
