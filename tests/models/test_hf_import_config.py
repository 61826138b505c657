"""ModelConfig: presets, HF config.json conversion both ways, and config errors."""

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from cqr_jax.models.config import PRESETS, ConfigError, ModelConfig
from cqr_jax.models.rope import inv_frequencies


def test_presets_have_the_real_sizes():
  # parameter counts of the released checkpoints (HF model cards), to 1%
  expected = {"qwen2p5_0p5b": 494e6, "qwen2p5_1p5b": 1.54e9, "qwen2p5_3b": 3.09e9,
              "qwen2p5_7b": 7.62e9, "llama3p2_1b": 1.24e9, "llama3p2_3b": 3.21e9,
              "smollm2_135m": 134.5e6, "smollm2_360m": 362e6}
  assert set(expected) == set(PRESETS)
  for name, count in expected.items():
    cfg = getattr(ModelConfig, name)()
    assert abs(cfg.num_params() / count - 1) < 0.01, (name, cfg.num_params())
  assert ModelConfig.preset("Qwen2.5-3B") == ModelConfig.qwen2p5_3b()
  assert ModelConfig.llama3p2_3b().eos_token_ids == (128001, 128008, 128009)
  with pytest.raises(ConfigError, match="unknown model preset 'gpt2'"):
    ModelConfig.preset("gpt2")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip_and_transformers_reads_it(name):
  cfg = ModelConfig.preset(name)
  d = cfg.to_hf_config()
  assert ModelConfig.from_hf_config(d) == cfg
  hf = (Qwen2Config if cfg.family == "qwen2" else LlamaConfig).from_dict(d)
  assert hf.num_key_value_heads == cfg.num_kv_heads and hf.head_dim == cfg.head_dim
  assert hf.tie_word_embeddings == cfg.tie_word_embeddings
  assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
  # ... and what transformers writes back (transformers-5 `rope_parameters` spelling) too
  assert ModelConfig.from_hf_config(dict(hf.to_dict(), architectures=d["architectures"])) == cfg


def test_llama3_inv_frequencies_equal_transformers():
  cfg = ModelConfig.llama3p2_1b()
  hf = LlamaConfig.from_dict(cfg.to_hf_config())
  ref, scale = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
  assert scale == 1.0
  ours = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref.numpy(), rtol=1.2e-7, atol=0)  # 1 float32 ulp (pow)


def test_numerics_fields_and_errors(tmp_path):
  cfg = ModelConfig.from_hf_config(ModelConfig.smollm2_135m().to_hf_config(),
                                   compute_dtype="bfloat16", remat="dots_saveable")
  assert cfg.compute_dtype == "bfloat16" and cfg.remat == "dots_saveable"
  assert hash(cfg) == hash(cfg.replace())
  with pytest.raises(ConfigError, match="compute_dtype='float16'"):
    cfg.replace(compute_dtype="float16")
  with pytest.raises(ConfigError, match="remat='sometimes'"):
    cfg.replace(remat="sometimes")
  with pytest.raises(ConfigError, match="num_heads=9 must be a multiple of num_kv_heads=2"):
    cfg.replace(num_kv_heads=2)
  with pytest.raises(ConfigError, match=r"rope_scaling.rope_type='dynamic'"):
    cfg.replace(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
  d = ModelConfig.llama3p2_1b().to_hf_config()
  d["rope_scaling"].pop("low_freq_factor")
  with pytest.raises(ConfigError, match=r"rope_scaling.low_freq_factor is missing"):
    ModelConfig.from_hf_config(d)
  with pytest.raises(ConfigError, match=r"attention_bias=true is unsupported"):
    ModelConfig.from_hf_config(dict(ModelConfig.llama3p2_1b().to_hf_config(),
                                    attention_bias=True))
  with pytest.raises(ConfigError, match=r"hidden_act='gelu'"):
    ModelConfig.from_hf_config(dict(ModelConfig.smollm2_135m().to_hf_config(), hidden_act="gelu"))
  with pytest.raises(ConfigError, match=r"missing field 'vocab_size'"):
    d = ModelConfig.smollm2_135m().to_hf_config()
    del d["vocab_size"]
    ModelConfig.from_hf_config(d)
  with pytest.raises(ConfigError, match="no config.json"):
    ModelConfig.from_hf_config(tmp_path)


# The released Instruct checkpoints' config.json files (legacy rope spelling, torch_dtype, ...).
QWEN2P5_3B_JSON = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 32768,
    "max_window_layers": 70, "model_type": "qwen2", "num_attention_heads": 16,
    "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}
LLAMA3P2_3B_JSON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 24, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256}


def test_real_checkpoint_configs_parse_to_the_presets(tmp_path):
  assert ModelConfig.from_hf_config(QWEN2P5_3B_JSON) == ModelConfig.qwen2p5_3b()
  (tmp_path / "config.json").write_text(json.dumps(LLAMA3P2_3B_JSON))
  assert ModelConfig.from_hf_config(tmp_path) == ModelConfig.llama3p2_3b()
