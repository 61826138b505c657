"""Export to a Hugging Face folder that transformers (and vLLM) load as-is (issue 8).

`export_hf` streams a (possibly sharded, possibly multi-host) model state tensor by tensor into
safetensors files: shard boundaries are planned from shapes alone, each file's header is written
first, then every tensor is fetched (jax.device_get, or process_allgather for arrays that span
hosts), cast, written and dropped, so host memory holds one tensor at a time. Process 0 writes;
every process must call `export_hf` (the gathers are collectives). Beside the weights: config.json
(ModelConfig.to_hf_config: family architecture, llama3 rope scaling, tied flag, dtype),
generation_config.json, tokenizer files with the chat template, and a README model card.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

SAFE_DTYPES = {"float32": ("F32", np.dtype(np.float32)), "bfloat16": ("BF16", None)}
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3  # 2 GiB per safetensors file
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ExportError(ValueError):
  """Bad export input (names the path, tensor or field)."""


def _np_dtype(dtype: str) -> np.dtype:
  if dtype not in SAFE_DTYPES:
    raise ExportError(f"dtype={dtype!r}: expected one of {sorted(SAFE_DTYPES)}")
  if dtype == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return SAFE_DTYPES[dtype][1]


# ----------------------------------------------------------------------------------------------
# Streaming, size-sharded safetensors


def plan_shards(specs: Sequence[tuple[str, tuple[int, ...]]], itemsize: int,
                max_shard_bytes: int) -> list[list[int]]:
  """Greedy split of tensors (in order) into files of at most `max_shard_bytes` of data.

  A tensor larger than the limit gets a file of its own (as transformers does).
  """
  shards, cur, cur_bytes = [], [], 0
  for i, (_, shape) in enumerate(specs):
    n = int(np.prod(shape, dtype=np.int64)) * itemsize
    if cur and cur_bytes + n > max_shard_bytes:
      shards.append(cur)
      cur, cur_bytes = [], 0
    cur.append(i)
    cur_bytes += n
  if cur:
    shards.append(cur)
  return shards


def _header(specs, idx: list[int], safe_dtype: str, itemsize: int) -> bytes:
  head: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  off = 0
  for i in idx:
    name, shape = specs[i]
    n = int(np.prod(shape, dtype=np.int64)) * itemsize
    head[name] = {"dtype": safe_dtype, "shape": list(shape), "data_offsets": [off, off + n]}
    off += n
  raw = json.dumps(head, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
  return struct.pack("<Q", len(raw)) + raw


def write_safetensors(named_arrays: Iterable[tuple[str, Any]], out_dir: str | os.PathLike, *,
                      specs: Sequence[tuple[str, tuple[int, ...]]], dtype: str = "float32",
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      write: bool = True) -> dict[str, str]:
  """Writes `(name, array)` pairs, arriving in the order of `specs` = [(name, shape)], as
  `model.safetensors` or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`.

  Arrays may be numpy or host-convertible; each is cast to `dtype` (round to nearest even for
  bfloat16) and written immediately. With `write=False` (processes other than 0) the iterator is
  still consumed so collectives inside it run everywhere, and nothing is written.
  Returns the weight map {tensor name: file name}.
  """
  np_dt = _np_dtype(dtype)
  safe_dt = SAFE_DTYPES[dtype][0]
  specs = [(n, tuple(int(s) for s in shape)) for n, shape in specs]
  names = [n for n, _ in specs]
  if len(set(names)) != len(names):
    raise ExportError(f"duplicate tensor names in export specs: {sorted(names)}")
  shards = plan_shards(specs, np_dt.itemsize, max_shard_bytes)
  files = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  weight_map = {specs[i][0]: files[k] for k, idx in enumerate(shards) for i in idx}
  it = iter(named_arrays)
  total = 0
  for k, idx in enumerate(shards):
    f = open(os.path.join(out_dir, files[k]), "wb") if write else None
    try:
      if f is not None:
        f.write(_header(specs, idx, safe_dt, np_dt.itemsize))
      for i in idx:
        want_name, want_shape = specs[i]
        try:
          name, arr = next(it)
        except StopIteration:
          raise ExportError(f"tensor {want_name!r} expected but the tensor stream ended") from None
        if name != want_name:
          raise ExportError(f"tensor stream out of order: got {name!r}, expected {want_name!r}")
        arr = np.asarray(arr)
        if arr.shape != want_shape:
          raise ExportError(f"tensor {name!r}: shape {arr.shape}, expected {want_shape}")
        arr = np.ascontiguousarray(arr.astype(np_dt, copy=False))
        total += arr.nbytes
        if f is not None:  # raw little-endian bytes (every platform JAX runs on), no copy
          f.write(arr.reshape(-1).view(np.uint8).data)
        del arr
    finally:
      if f is not None:
        f.close()
  extra = next(it, None)
  if extra is not None:
    raise ExportError(f"unexpected tensor {extra[0]!r} after the planned ones")
  if write and len(files) > 1:
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return weight_map


# ----------------------------------------------------------------------------------------------
# Model state -> HF tensors


def _as_state(model_state_or_model):
  """An nnx.State of parameters from a Decoder, an nnx.State, or a nested dict restored from
  Orbax (string layer indices and `{"value": array}` leaves are accepted)."""
  from flax import nnx
  if isinstance(model_state_or_model, nnx.Module):
    return nnx.state(model_state_or_model, nnx.Param)
  if isinstance(model_state_or_model, nnx.State):
    return model_state_or_model
  if not isinstance(model_state_or_model, dict):
    raise ExportError(f"cannot export a {type(model_state_or_model).__name__}: expected a "
                      "Decoder, an nnx.State or a nested dict of arrays")
  flat = []

  def walk(prefix, node):
    if isinstance(node, dict) and set(node) == {"value"}:
      node = node["value"]
    if isinstance(node, dict):
      for k, v in node.items():
        walk(prefix + (int(k) if isinstance(k, str) and k.isdigit() else k,), v)
    else:
      flat.append((prefix, node[...] if isinstance(node, nnx.Variable) else node))

  walk((), model_state_or_model)
  return nnx.from_flat_state(flat)


def hf_tensor_specs(state, config) -> list[tuple[str, tuple[int, ...]]]:
  """[(HF name, HF shape)] in export order, from the state's shapes (no data is fetched)."""
  from flax import nnx
  from cqr_jax.models.hf_names import hf_names, hf_to_ours
  flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
  specs = []
  for name in hf_names(config):
    path, transform = hf_to_ours(name)
    if path not in flat:
      raise ExportError(f"model state has no parameter {'.'.join(map(str, path))!r} (needed "
                        f"for HF tensor {name!r}); is the config ({config.family}, "
                        f"tie_word_embeddings={config.tie_word_embeddings}) the model's?")
    shape = tuple(int(s) for s in flat[path].shape)
    specs.append((name, shape[::-1] if transform == "transpose" else shape))
  return specs


# ----------------------------------------------------------------------------------------------
# Side files


def default_model_card(config, dtype: str, body: str | None = None) -> str:
  """README.md with HF front matter; `body` (training recipe, evaluation table) goes below."""
  arch = config.to_hf_config()["architectures"][0]
  lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
           "tags:", "- cqr-jax", "- conversational-query-rewriting", "---", ""]
  if body is not None and body.lstrip().startswith("---"):
    return body  # already a complete card
  if body is None:
    body = ("# Conversational query rewriter\n\nA policy trained with cqr-jax (ConvSearch-R1: "
            "self-driven warm-up, then rank-incentive GRPO) to rewrite a conversational question "
            "into a standalone search query.\n")
  lines += [body.rstrip("\n"), "", "## Export", "",
            f"- architecture: `{arch}` ({config.num_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_heads} heads / {config.num_kv_heads} KV heads, vocab "
            f"{config.vocab_size}, {config.num_params() / 1e6:.1f}M parameters)",
            f"- weights: safetensors, {dtype}; tied embeddings: {config.tie_word_embeddings}",
            "- exported from a JAX/Flax NNX state by `cqr_jax.models.hf_export.export_hf`", ""]
  return "\n".join(lines)


def _generation_config(config, tokenizer, extra: dict | None) -> dict:
  eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
  gen: dict[str, Any] = {"bos_token_id": config.bos_token_id, "eos_token_id": eos}
  if tokenizer is not None and tokenizer.pad_token_id is not None:
    gen["pad_token_id"] = tokenizer.pad_token_id
  gen.update(extra or {})
  return {k: v for k, v in gen.items() if v is not None}


def _load_tokenizer(tokenizer):
  if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
    return tokenizer
  from transformers import AutoTokenizer
  path = os.fspath(tokenizer)
  if not os.path.isdir(path):
    raise ExportError(f"tokenizer_dir {path!r} is not a folder")
  return AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------------------------
# The export


def export_hf(model_state_or_model, config, out_dir: str | os.PathLike, *,
              dtype: str = "float32", tokenizer_dir=None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, model_card: str | None = None,
              generation_config: dict | None = None, overwrite: bool = False) -> str:
  """Writes an HF folder that `AutoModelForCausalLM.from_pretrained(out_dir)` loads.

  Args:
    model_state_or_model: a Decoder, its nnx.State, or a nested dict of arrays with the model's
      structure (e.g. restored from Orbax); arrays may be sharded across devices and hosts.
    config: the ModelConfig of that state (its family decides the HF architecture).
    out_dir: the folder to create; an existing non-empty folder is refused unless `overwrite`.
    dtype: "float32" or "bfloat16" for the safetensors (config.json's `dtype` says the same).
    tokenizer_dir: a tokenizer folder (or tokenizer object) whose files and chat template are
      saved beside the weights.
    max_shard_bytes: data bytes per safetensors file; more files get an index json.
    model_card: README body (recipe, evaluation table) or a full card with front matter.
    generation_config: entries merged over the defaults (bos/eos/pad ids).
    overwrite: replace an existing out_dir.
  Returns the output folder. Every process must call this; process 0 writes.
  """
  import jax
  out_dir = os.path.abspath(os.fspath(out_dir))
  _np_dtype(dtype)
  main = jax.process_index() == 0
  taken = os.path.exists(out_dir) and (not os.path.isdir(out_dir) or bool(os.listdir(out_dir)))
  if jax.process_count() > 1:  # decide as process 0 sees it, so no process is left in a gather
    from jax.experimental import multihost_utils
    taken = bool(multihost_utils.broadcast_one_to_all(np.asarray(taken)))
  if taken:
    if not overwrite:
      raise ExportError(f"output folder {out_dir} exists; pass overwrite=True (--overwrite) to "
                        "replace it")
  state = _as_state(model_state_or_model)
  specs = hf_tensor_specs(state, config)
  tokenizer = _load_tokenizer(tokenizer_dir) if main else None
  tmp = f"{out_dir}.tmp-export"
  if main:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
    os.makedirs(tmp)
  try:
    from cqr_jax.models.hf_names import params_to_hf
    write_safetensors(params_to_hf(state, config), tmp, specs=specs, dtype=dtype,
                      max_shard_bytes=max_shard_bytes, write=main)
    if main:
      with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config.to_hf_config(dtype=dtype), f, indent=2)
      with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump(_generation_config(config, tokenizer, generation_config), f, indent=2)
      if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
      with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(default_model_card(config, dtype, model_card))
      if os.path.exists(out_dir):
        shutil.rmtree(out_dir) if os.path.isdir(out_dir) else os.remove(out_dir)
      os.replace(tmp, out_dir)
  finally:
    if main and os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


# ----------------------------------------------------------------------------------------------
# Hub upload


def upload_operations(out_dir: str | os.PathLike) -> list:
  """`huggingface_hub.CommitOperationAdd` for each file of an exported folder (no dotfiles)."""
  from huggingface_hub import CommitOperationAdd
  out_dir = os.fspath(out_dir)
  if not os.path.isfile(os.path.join(out_dir, "config.json")):
    raise ExportError(f"{out_dir}: not an exported HF folder (no config.json)")
  ops = []
  for root, dirs, files in os.walk(out_dir):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(files):
      if name.startswith("."):
        continue
      path = os.path.join(root, name)
      in_repo = os.path.relpath(path, out_dir).replace(os.sep, "/")
      ops.append(CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=path))
  return ops


def push_to_hub(out_dir: str | os.PathLike, repo_id: str, *, token: str | None = None,
                private: bool = False, commit_message: str = "Upload cqr-jax export",
                dry_run: bool = False):
  """Uploads an exported folder to the Hugging Face Hub as one commit (creating the repo).

  With `dry_run` nothing touches the network: the list of upload operations is returned.
  """
  ops = upload_operations(out_dir)
  if dry_run:
    return ops
  from huggingface_hub import HfApi
  api = HfApi(token=token)
  api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
  return api.create_commit(repo_id=repo_id, repo_type="model", operations=ops,
                           commit_message=commit_message)
