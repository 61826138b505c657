"""`ModelConfig`: the decoder's architecture (from / to a Hugging Face `config.json`) and numerics.

Two families share one decoder (method.md 1.1: Qwen2.5-*-Instruct and Llama-3.2-*-Instruct
backbones; SmolLM2 is a Llama): they differ only in q/k/v biases (Qwen2), llama3 RoPE scaling
(Llama-3.x) and whether the LM head is tied to the embedding.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

FAMILIES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
COMPUTE_DTYPES = ("float32", "bfloat16")
PARAM_DTYPES = ("float32", "bfloat16")
# Names for `remat`: "none" (store activations), "full" (recompute each layer), or a
# `jax.checkpoint_policies` name (e.g. "dots_saveable", "dots_with_no_batch_dims_saveable").
REMAT_SIMPLE = ("none", "full")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")


class ConfigError(ValueError):
  """An unsupported or malformed model configuration (names the field and what was expected)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder architecture plus numerics. Field names follow HF where they exist.

  `rope_scaling` is None or a dict {"rope_type": "llama3", "factor", "low_freq_factor",
  "high_freq_factor", "original_max_position_embeddings"} (Llama-3.x). `compute_dtype` "bfloat16"
  feeds bf16 operands to every matmul with float32 accumulation (`preferred_element_type`);
  norms, softmax, residuals and logits stay float32.
  """
  family: str = "llama"
  vocab_size: int = 49152
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  rope_theta: float = 100000.0
  rope_scaling: dict | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = True
  qkv_bias: bool = False
  max_position_embeddings: int = 8192
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: str = "none"
  # Run the blocks as one lax.scan over their parameters stacked at trace time (the parameter
  # tree stays per layer): a program compiles one block instead of L, so compile time no longer
  # grows with depth; the cost is one stacked copy of the block weights per call.
  scan_layers: bool = False

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ConfigError(f"family={self.family!r}: expected one of {sorted(FAMILIES)}")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ConfigError(f"compute_dtype={self.compute_dtype!r}: expected one of {COMPUTE_DTYPES}")
    if self.param_dtype not in PARAM_DTYPES:
      raise ConfigError(f"param_dtype={self.param_dtype!r}: expected one of {PARAM_DTYPES}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads={self.num_heads} must be a multiple of "
                        f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim}: RoPE needs an even head_dim")
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    _check_rope_scaling(self.rope_scaling)
    _check_remat(self.remat)

  # Hashable although rope_scaling is a dict (configs are static arguments of jitted functions).
  def __hash__(self):
    rs = None if self.rope_scaling is None else tuple(sorted(self.rope_scaling.items()))
    fields = [getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope_scaling"]
    return hash((tuple(fields), rs))

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    """All end-of-sequence ids as a tuple (HF allows an int or a list)."""
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    """Parameter count (embedding counted once when tied)."""
    d, f, h, kv, dh = (self.hidden_size, self.intermediate_size, self.num_heads,
                       self.num_kv_heads, self.head_dim)
    attn = d * h * dh * 2 + d * kv * dh * 2 + (h * dh + 2 * kv * dh if self.qkv_bias else 0)
    layer = attn + 3 * d * f + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * layer + emb + d

  # ---------------------------------------------------------------- HF config.json conversion
  @classmethod
  def from_hf_config(cls, cfg: dict | str | os.PathLike, **overrides) -> "ModelConfig":
    """Builds a config from an HF `config.json` dict, file, or model folder.

    Accepts both the legacy (`rope_theta` + `rope_scaling`) and the transformers-5
    (`rope_parameters`) RoPE spellings. `overrides` set numerics (param_dtype, compute_dtype,
    remat) or any other field.
    """
    where = "config"
    if not isinstance(cfg, dict):
      path = os.fspath(cfg)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      where = path
      if not os.path.exists(path):
        raise ConfigError(f"{path}: no config.json found")
      with open(path) as f:
        cfg = json.load(f)
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    family = {"qwen2": "qwen2", "llama": "llama"}.get(model_type)
    if family is None:
      for fam, arch in FAMILIES.items():
        if arch in archs:
          family = fam
    if family is None:
      raise ConfigError(f"{where}: model_type={model_type!r}, architectures={archs}: unsupported "
                        f"architecture; expected model_type 'qwen2' or 'llama' "
                        f"({', '.join(FAMILIES.values())})")
    for arch in archs:
      if arch not in FAMILIES.values():
        raise ConfigError(f"{where}: architectures={archs}: unsupported architecture {arch!r}; "
                          f"expected one of {list(FAMILIES.values())}")

    def need(key):
      if key not in cfg:
        raise ConfigError(f"{where}: missing field {key!r}")
      return cfg[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = cfg.get("head_dim") or hidden // heads
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
      raise ConfigError(f"{where}: hidden_act={act!r}: unsupported; expected 'silu'")
    if family == "llama":
      for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
          raise ConfigError(f"{where}: {key}=true is unsupported; expected false")
    if cfg.get("use_sliding_window"):
      raise ConfigError(f"{where}: use_sliding_window=true is unsupported; expected false")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
      raise ConfigError(f"{where}: partial_rotary_factor={cfg['partial_rotary_factor']}: "
                        f"unsupported; expected 1.0")
    theta, scaling = _rope_from_hf(cfg, where)
    eos = cfg.get("eos_token_id")
    kw = dict(
        family=family, vocab_size=int(need("vocab_size")), hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(head_dim),
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),  # HF 5 default
        qkv_bias=(family == "qwen2"),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos)
    kw.update(overrides)
    try:
      return cls(**kw)
    except ConfigError as e:
      raise ConfigError(f"{where}: {e}") from None

  def to_hf_config(self, dtype: str | None = None) -> dict[str, Any]:
    """The HF `config.json` dict for this architecture (legacy rope spelling, which transformers
    4.x and 5.x both read). `dtype` defaults to `param_dtype`."""
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    cfg = {
        "architectures": [FAMILIES[self.family]],
        "model_type": self.family,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype or self.param_dtype,
    }
    if self.family == "llama":
      cfg.update(attention_bias=False, mlp_bias=False)
    else:
      cfg.update(use_sliding_window=False, sliding_window=None,
                 max_window_layers=self.num_layers)
    return cfg

  # ---------------------------------------------------------------- presets (HF config numbers)
  @classmethod
  def preset(cls, name: str, **overrides) -> "ModelConfig":
    """A named preset (see `PRESETS`); dashes and dots are accepted ("qwen2.5-3b")."""
    key = name.lower().replace("-", "_").replace(".", "p")
    if key not in PRESETS:
      raise ConfigError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return cls(**{**PRESETS[key], **overrides})

  @classmethod
  def qwen2p5_0p5b(cls, **kw): return cls.preset("qwen2p5_0p5b", **kw)
  @classmethod
  def qwen2p5_1p5b(cls, **kw): return cls.preset("qwen2p5_1p5b", **kw)
  @classmethod
  def qwen2p5_3b(cls, **kw): return cls.preset("qwen2p5_3b", **kw)
  @classmethod
  def qwen2p5_7b(cls, **kw): return cls.preset("qwen2p5_7b", **kw)
  @classmethod
  def llama3p2_1b(cls, **kw): return cls.preset("llama3p2_1b", **kw)
  @classmethod
  def llama3p2_3b(cls, **kw): return cls.preset("llama3p2_3b", **kw)
  @classmethod
  def smollm2_135m(cls, **kw): return cls.preset("smollm2_135m", **kw)
  @classmethod
  def smollm2_360m(cls, **kw): return cls.preset("smollm2_360m", **kw)


def _check_rope_scaling(rs):
  if rs is None:
    return
  if not isinstance(rs, dict):
    raise ConfigError(f"rope_scaling={rs!r}: expected None or a dict with rope_type 'llama3'")
  rtype = rs.get("rope_type", rs.get("type"))
  if rtype != "llama3":
    raise ConfigError(f"rope_scaling.rope_type={rtype!r}: unsupported rope type; "
                      f"expected 'llama3' or no rope_scaling")
  for key in LLAMA3_ROPE_KEYS:
    if key not in rs:
      raise ConfigError(f"rope_scaling.{key} is missing (needed by rope_type 'llama3')")


def _check_remat(remat):
  import jax
  if remat in REMAT_SIMPLE or hasattr(jax.checkpoint_policies, remat):
    return
  raise ConfigError(f"remat={remat!r}: expected 'none', 'full' or a jax.checkpoint_policies name")


def _rope_from_hf(cfg: dict, where: str) -> tuple[float, dict | None]:
  """(rope_theta, rope_scaling) from either HF spelling."""
  params = cfg.get("rope_parameters")
  if isinstance(params, dict) and "rope_theta" in params:
    theta = float(params["rope_theta"])
    rtype = params.get("rope_type", params.get("type", "default"))
    scaling = None if rtype == "default" else dict(params)
    key = "rope_parameters"
  else:
    theta = float(cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    key = "rope_scaling"
    if scaling is not None:
      scaling = dict(scaling)
      if scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
  if scaling is None:
    return theta, None
  rtype = scaling.get("rope_type", scaling.get("type"))
  if rtype != "llama3":
    raise ConfigError(f"{where}: {key}.rope_type={rtype!r}: unsupported rope type; expected "
                      f"'llama3' or 'default'")
  out = {"rope_type": "llama3"}
  for k in LLAMA3_ROPE_KEYS:
    if k not in scaling:
      raise ConfigError(f"{where}: {key}.{k} is missing (needed by rope_type 'llama3')")
    out[k] = scaling[k]
  return theta, out


_QWEN = dict(family="qwen2", vocab_size=151936, head_dim=128, rope_theta=1000000.0,
             rms_norm_eps=1e-6, qkv_bias=True, max_position_embeddings=32768,
             bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True)
_LLAMA32 = dict(family="llama", vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                max_position_embeddings=131072, bos_token_id=128000,
                eos_token_id=(128001, 128008, 128009), tie_word_embeddings=True,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
_SMOL = dict(family="llama", vocab_size=49152, head_dim=64, rope_theta=100000.0,
             rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=True)

# The Instruct checkpoints' HF config.json numbers (method.md 1.1 backbones and Fig. 3 scaling).
PRESETS: dict[str, dict] = {
    "qwen2p5_0p5b": {**_QWEN, "hidden_size": 896, "intermediate_size": 4864, "num_layers": 24,
                     "num_heads": 14, "num_kv_heads": 2, "head_dim": 64},
    "qwen2p5_1p5b": {**_QWEN, "hidden_size": 1536, "intermediate_size": 8960, "num_layers": 28,
                     "num_heads": 12, "num_kv_heads": 2},
    "qwen2p5_3b": {**_QWEN, "hidden_size": 2048, "intermediate_size": 11008, "num_layers": 36,
                   "num_heads": 16, "num_kv_heads": 2},
    "qwen2p5_7b": {**_QWEN, "vocab_size": 152064, "hidden_size": 3584,
                   "intermediate_size": 18944, "num_layers": 28, "num_heads": 28,
                   "num_kv_heads": 4, "tie_word_embeddings": False},
    "llama3p2_1b": {**_LLAMA32, "hidden_size": 2048, "intermediate_size": 8192,
                    "num_layers": 16, "num_heads": 32, "num_kv_heads": 8, "head_dim": 64},
    "llama3p2_3b": {**_LLAMA32, "hidden_size": 3072, "intermediate_size": 8192,
                    "num_layers": 28, "num_heads": 24, "num_kv_heads": 8, "head_dim": 128},
    "smollm2_135m": {**_SMOL, "hidden_size": 576, "intermediate_size": 1536, "num_layers": 30,
                     "num_heads": 9, "num_kv_heads": 3},
    "smollm2_360m": {**_SMOL, "hidden_size": 960, "intermediate_size": 2560, "num_layers": 32,
                     "num_heads": 15, "num_kv_heads": 5},
}
