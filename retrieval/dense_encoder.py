"""Dense passage/query encoder: BERT/RoBERTa in Flax NNX, imported from a local HF folder.

Pooling modes (method.md 4.2, 5.3):
- "cls_linear_ln": ANCE. First-token hidden state -> Linear(H->E) -> LayerNorm(E). The HF ANCE
  checkpoints (castorini/ance-msmarco-passage, 3ricL/ad-hoc-ance-msmarco) name the head
  `embeddingHead` and `norm`, the backbone `roberta.*`.
- "mean_norm": sentence-transformers (all-MiniLM-L6-v2): masked mean over tokens, L2-normalised.
- "cls", "mean": the same without the head / without normalisation.

The backbone is the post-LayerNorm Transformer encoder of BERT (Devlin et al. 2019); RoBERTa only
differs in its position ids (count from pad_token_id + 1, skipping pads).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cqr_jax.sharding import put_global

POOLINGS = ("cls_linear_ln", "mean_norm", "cls", "mean")
_FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert")
_ACTS: dict[str, Callable] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Backbone + pooling. Defaults: roberta-base with the ANCE head (method.md 4.2)."""
  family: str = "roberta"
  vocab_size: int = 50265
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_positions: int = 514
  type_vocab_size: int = 1
  layer_norm_eps: float = 1e-5
  hidden_act: str = "gelu"
  pad_token_id: int = 1
  pooling: str = "cls_linear_ln"
  head_dim: int = 768  # ANCE embeddingHead output size
  head_ln_eps: float = 1e-5  # torch.nn.LayerNorm default, as in ANCE's `norm`

  @property
  def roberta_positions(self) -> bool:
    return self.family != "bert"

  @classmethod
  def from_hf(cls, cfg: dict, pooling: str, source: str = "config.json") -> "EncoderConfig":
    """Reads a transformers config.json dict; errors name `source` and the field."""
    family = cfg.get("model_type")
    if family not in _FAMILIES:
      raise ValueError(f"{source}: model_type {family!r} is not a BERT/RoBERTa family model "
                       f"(supported: {_FAMILIES})")
    if pooling not in POOLINGS:
      raise ValueError(f"pooling {pooling!r} unknown; expected one of {POOLINGS}")
    pos = cfg.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(f"{source}: position_embedding_type {pos!r} unsupported (only 'absolute')")
    act = cfg.get("hidden_act", "gelu")
    if act not in _ACTS:
      raise ValueError(f"{source}: hidden_act {act!r} unsupported (supported: {list(_ACTS)})")
    try:
      return cls(family=family, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                 num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                 intermediate_size=cfg["intermediate_size"],
                 max_positions=cfg["max_position_embeddings"],
                 type_vocab_size=cfg.get("type_vocab_size", 2),
                 layer_norm_eps=cfg.get("layer_norm_eps", 1e-12), hidden_act=act,
                 pad_token_id=cfg.get("pad_token_id", 0) or 0, pooling=pooling,
                 head_dim=cfg.get("hidden_size"))
    except KeyError as e:
      raise ValueError(f"{source}: missing field {e.args[0]!r}") from None


class _Layer(nnx.Module):
  """One post-LN Transformer encoder block."""

  def __init__(self, c: EncoderConfig, rngs: nnx.Rngs):
    h, f = c.hidden_size, c.intermediate_size
    self.q = nnx.Linear(h, h, rngs=rngs)
    self.k = nnx.Linear(h, h, rngs=rngs)
    self.v = nnx.Linear(h, h, rngs=rngs)
    self.o = nnx.Linear(h, h, rngs=rngs)
    self.attn_ln = nnx.LayerNorm(h, epsilon=c.layer_norm_eps, rngs=rngs)
    self.ffn_in = nnx.Linear(h, f, rngs=rngs)
    self.ffn_out = nnx.Linear(f, h, rngs=rngs)
    self.ffn_ln = nnx.LayerNorm(h, epsilon=c.layer_norm_eps, rngs=rngs)
    self.num_heads, self.act = c.num_heads, _ACTS[c.hidden_act]

  def __call__(self, x_btd, bias_b11t):
    b, t, d = x_btd.shape
    split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    q_btnh, k_btnh, v_btnh = split(self.q(x_btd)), split(self.k(x_btd)), split(self.v(x_btd))
    logits_bnts = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_btnh) / np.sqrt(d // self.num_heads)
    p_bnts = jax.nn.softmax(logits_bnts.astype(jnp.float32) + bias_b11t, axis=-1)
    a_btd = jnp.einsum("bnts,bsnh->btnh", p_bnts.astype(x_btd.dtype), v_btnh).reshape(b, t, d)
    x_btd = self.attn_ln(x_btd + self.o(a_btd))
    return self.ffn_ln(x_btd + self.ffn_out(self.act(self.ffn_in(x_btd))))


class BertEncoder(nnx.Module):
  """Embeddings + encoder blocks + pooling; `__call__(ids, mask) -> [B, E]` embeddings."""

  def __init__(self, c: EncoderConfig, rngs: nnx.Rngs):
    self.config = c
    h = c.hidden_size
    self.word = nnx.Embed(c.vocab_size, h, rngs=rngs)
    self.pos = nnx.Embed(c.max_positions, h, rngs=rngs)
    self.type = nnx.Embed(c.type_vocab_size, h, rngs=rngs)
    self.emb_ln = nnx.LayerNorm(h, epsilon=c.layer_norm_eps, rngs=rngs)
    self.layers = nnx.List([_Layer(c, rngs) for _ in range(c.num_layers)])
    if c.pooling == "cls_linear_ln":
      self.head = nnx.Linear(h, c.head_dim, rngs=rngs)
      self.head_ln = nnx.LayerNorm(c.head_dim, epsilon=c.head_ln_eps, rngs=rngs)

  def __call__(self, ids_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    c = self.config
    if c.roberta_positions:  # HF create_position_ids_from_input_ids
      real_bt = (ids_bt != c.pad_token_id).astype(jnp.int32)
      pos_bt = jnp.cumsum(real_bt, axis=1) * real_bt + c.pad_token_id
    else:
      pos_bt = jnp.broadcast_to(jnp.arange(ids_bt.shape[1]), ids_bt.shape)
    x_btd = self.word(ids_bt) + self.pos(pos_bt) + self.type(jnp.zeros_like(ids_bt))
    x_btd = self.emb_ln(x_btd)
    m_bt = mask_bt.astype(jnp.float32)
    bias_b11t = ((1.0 - m_bt) * jnp.finfo(jnp.float32).min)[:, None, None, :]
    for layer in self.layers:
      x_btd = layer(x_btd, bias_b11t)
    x_btd = x_btd.astype(jnp.float32)
    if c.pooling in ("cls", "cls_linear_ln"):
      e_bd = x_btd[:, 0]
      if c.pooling == "cls_linear_ln":
        e_bd = self.head_ln(self.head(e_bd))
      return e_bd
    e_bd = (x_btd * m_bt[..., None]).sum(1) / jnp.maximum(m_bt.sum(1, keepdims=True), 1e-9)
    if c.pooling == "mean_norm":  # torch.nn.functional.normalize(p=2, eps=1e-12)
      e_bd = e_bd / jnp.maximum(jnp.linalg.norm(e_bd, axis=-1, keepdims=True), 1e-12)
    return e_bd


# ---- HF weights -> NNX state -------------------------------------------------------------------

def _hf_name_map(c: EncoderConfig) -> dict[tuple, tuple[str, bool]]:
  """NNX param path -> (HF key without the model prefix, transpose?)."""
  m: dict[tuple, tuple[str, bool]] = {}

  def ln(path, key):
    m[path + ("scale",)] = (key + ".weight", False)
    m[path + ("bias",)] = (key + ".bias", False)

  def lin(path, key):
    m[path + ("kernel",)] = (key + ".weight", True)
    m[path + ("bias",)] = (key + ".bias", False)

  for ours, theirs in (("word", "word"), ("pos", "position"), ("type", "token_type")):
    m[(ours, "embedding")] = (f"embeddings.{theirs}_embeddings.weight", False)
  ln(("emb_ln",), "embeddings.LayerNorm")
  for i in range(c.num_layers):
    p, k = ("layers", i), f"encoder.layer.{i}."
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
      lin(p + (ours,), k + "attention.self." + theirs)
    lin(p + ("o",), k + "attention.output.dense")
    ln(p + ("attn_ln",), k + "attention.output.LayerNorm")
    lin(p + ("ffn_in",), k + "intermediate.dense")
    lin(p + ("ffn_out",), k + "output.dense")
    ln(p + ("ffn_ln",), k + "output.LayerNorm")
  if c.pooling == "cls_linear_ln":
    lin(("head",), "@embeddingHead")  # '@': top-level key, no backbone prefix
    ln(("head_ln",), "@norm")
  return m


def read_hf_weights(path: str) -> dict[str, np.ndarray]:
  """All tensors of an HF folder: model.safetensors (or sharded), else pytorch_model.bin."""
  from safetensors.numpy import load_file
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if files:
    out = {}
    for f in files:
      out.update(load_file(os.path.join(path, f)))
    return out
  bin_path = os.path.join(path, "pytorch_model.bin")
  if os.path.exists(bin_path):
    import torch  # only for legacy checkpoints
    sd = torch.load(bin_path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in sd.items()}
  raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model.bin weights")


def _fix_legacy(key: str) -> str:
  return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                    "LayerNorm.bias")


def load_bert_encoder(path: str, pooling: str, dtype=jnp.float32) -> BertEncoder:
  """Builds a `BertEncoder` from an HF folder; a missing or misshapen tensor is named."""
  cfg_path = os.path.join(path, "config.json")
  with open(cfg_path) as f:
    c = EncoderConfig.from_hf(json.load(f), pooling, source=cfg_path)
  weights = {_fix_legacy(k): v for k, v in read_hf_weights(path).items()}
  if c.pooling == "cls_linear_ln":
    if "embeddingHead.weight" not in weights:
      raise ValueError(f"{path}: pooling 'cls_linear_ln' needs the ANCE head tensors "
                       "'embeddingHead.weight/bias' and 'norm.weight/bias'")
    c = dataclasses.replace(c, head_dim=int(weights["embeddingHead.weight"].shape[0]))
  prefixes = [p for p in ("", f"{c.family}.", "bert.", "roberta.")
              if p + "embeddings.word_embeddings.weight" in weights]
  if not prefixes:
    raise ValueError(f"{path}: no 'embeddings.word_embeddings.weight' tensor (with or without a "
                     f"'{c.family}.' prefix); is this a BERT/RoBERTa checkpoint?")
  prefix = prefixes[0]
  model = nnx.eval_shape(lambda: BertEncoder(c, nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  names = _hf_name_map(c)
  flat = []
  for p, var in nnx.to_flat_state(state):
    key, transpose = names[p]
    key = key[1:] if key.startswith("@") else prefix + key
    if key not in weights:
      raise ValueError(f"{path}: missing tensor {key!r}")
    w = weights[key].T if transpose else weights[key]
    if w.shape != var.shape:
      raise ValueError(f"{path}: tensor {key!r} has shape {w.shape}, expected {var.shape}")
    flat.append((p, var.replace(jnp.asarray(w, dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---- text -> embeddings -------------------------------------------------------------------------

def _default_max_length(path: str, c: EncoderConfig, tokenizer) -> int:
  st = os.path.join(path, "sentence_bert_config.json")
  if os.path.exists(st):
    with open(st) as f:
      if "max_seq_length" in (d := json.load(f)):
        return int(d["max_seq_length"])
  limit = c.max_positions - (c.pad_token_id + 1 if c.roberta_positions else 0)
  return int(min(getattr(tokenizer, "model_max_length", limit) or limit, limit))


class DenseEncoder:
  """Tokenizer + jitted `BertEncoder`: `encode(texts) -> [N, E] float32`.

  Texts are sorted by length and padded to power-of-two buckets (>= 16, <= max_length), in
  fixed-size batches that never mix buckets, so a corpus compiles a handful of shapes and a
  text's padded length is a function of its own length. With a mesh the batch is split over
  every device (inputs built on each process from the same host batch, output replicated, so a
  mesh that spans processes works when every process passes the same texts). A row's embedding
  then depends only on its text and the rows per device: on CPU it is bit-identical for any
  device count, batch order or neighbours at equal rows per device (tests/retrieval/
  test_dense_index.py), which `cqr-jax index --dense` relies on.
  """

  def __init__(self, model: BertEncoder, tokenizer, max_length: int, batch_size: int = 64,
               mesh: jax.sharding.Mesh | None = None):
    self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
    self.max_length, self.batch_size = int(max_length), int(batch_size)
    self.pad_id = model.config.pad_token_id
    self.dim = model.config.head_dim if model.config.pooling == "cls_linear_ln" else (
        model.config.hidden_size)
    graphdef, state = nnx.split(model)
    self._batch_sharding = None
    fwd = lambda s, ids, mask: nnx.merge(graphdef, s)(ids, mask)
    if mesh is not None:  # data parallel: params replicated, batch split over every mesh axis
      P = jax.sharding.PartitionSpec
      whole = jax.sharding.NamedSharding(mesh, P())
      state = jax.tree.map(lambda x: put_global(np.asarray(x), whole), state)
      self._batch_sharding = jax.sharding.NamedSharding(mesh, P(tuple(mesh.axis_names)))
      self._fwd = jax.jit(fwd, out_shardings=whole)
    else:
      self._fwd = jax.jit(fwd)
    self._state = state

  @classmethod
  def from_hf(cls, path: str | os.PathLike, pooling: str = "cls_linear_ln",
              max_length: int | None = None, batch_size: int = 64, dtype=jnp.float32,
              mesh: jax.sharding.Mesh | None = None) -> "DenseEncoder":
    """Loads model + tokenizer from an HF folder (max_length: sentence_bert_config or model's).

    With a `mesh`, batches are split over all its devices (batch_size: a multiple of its size).
    """
    from transformers import AutoTokenizer
    path = os.fspath(path)
    model = load_bert_encoder(path, pooling, dtype)
    tok = AutoTokenizer.from_pretrained(path)
    if max_length is None:
      max_length = _default_max_length(path, model.config, tok)
    return cls(model, tok, max_length, batch_size, mesh)

  def tokenize(self, texts: Sequence[str], slice_size: int = 1024) -> list[list[int]]:
    """Token ids of each text, truncated to max_length. The tokenizer sees `slice_size` texts at
    a time: its per-call encodings keep every token before truncation (about 50 KB per
    100-word passage, bench/results/dense_index.md), the ids kept here a tenth of that."""
    out: list[list[int]] = []
    for s in range(0, len(texts), slice_size):
      out += self.tokenizer(list(texts[s:s + slice_size]), truncation=True,
                            max_length=self.max_length, padding=False,
                            return_attention_mask=False)["input_ids"]
    return out

  def _bucket(self, n: int) -> int:
    return min(max(16, 1 << (max(n, 1) - 1).bit_length()), self.max_length)

  @staticmethod
  def _batches(bucket_n: Sequence[int], bs: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of at most `bs` rows over rows sorted by bucket, cut where the
    bucket changes."""
    out, s = [], 0
    while s < len(bucket_n):
      e = min(s + bs, len(bucket_n))
      e = s + int(np.searchsorted(-np.asarray(bucket_n[s:e]), -bucket_n[s], side="right"))
      out.append((s, e))
      s = e
    return out

  def embed_ids(self, ids_bt: np.ndarray, mask_bt: np.ndarray) -> jax.Array:
    """[B, T] token ids + attention mask -> [B, E] embeddings (jitted)."""
    ids_bt, mask_bt = np.asarray(ids_bt, np.int32), np.asarray(mask_bt, np.int32)
    if self._batch_sharding is not None:
      ids_bt, mask_bt = (put_global(x, self._batch_sharding) for x in (ids_bt, mask_bt))
    return self._fwd(self._state, ids_bt, mask_bt)

  def encode(self, texts: Sequence[str], batch_size: int | None = None,
             progress: bool = False) -> np.ndarray:
    """Embeds `texts` -> [N, E] float32 in input order."""
    bs = int(batch_size or self.batch_size)
    if self.mesh is not None and bs % self.mesh.size:
      raise ValueError(f"batch_size {bs} must be a multiple of the mesh's {self.mesh.size} devices")
    toks = self.tokenize(texts)
    order = np.argsort([-len(t) for t in toks], kind="stable")
    out = np.zeros((len(toks), self.dim), np.float32)
    starts = self._batches([self._bucket(len(toks[r])) for r in order], bs)
    if progress:
      from tqdm.auto import tqdm
      starts = tqdm(starts, desc="encode", unit="batch")
    for s, e in starts:
      rows = order[s:e]
      t = self._bucket(max(len(toks[r]) for r in rows))
      ids_bt = np.full((bs, t), self.pad_id, np.int32)
      mask_bt = np.zeros((bs, t), np.int32)
      mask_bt[len(rows):, 0] = 1  # filler rows: one token, result dropped
      for i, r in enumerate(rows):
        ids_bt[i, :len(toks[r])] = toks[r]
        mask_bt[i, :len(toks[r])] = 1
      out[rows] = np.asarray(self.embed_ids(ids_bt, mask_bt))[:len(rows)]
    return out
