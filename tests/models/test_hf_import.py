"""HF folder import (single / sharded safetensors), the name map, export iterator, and errors."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from cqr_jax.models.config import ConfigError
from cqr_jax.models.hf_import import CheckpointError, load_from_hf_tensors, load_hf, load_tokenizer
from cqr_jax.models.hf_names import hf_names, hf_to_ours, ours_to_hf, params_to_hf
from cqr_jax.models.tiny_hf import hf_logits, padded_batch, save_tiny_hf
from cqr_jax.sharding import MeshConfig, make_mesh, param_specs
from cqr_jax.testing import save_tiny_tokenizer

PARITY_TOL = 1e-4


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
  """A tiny untied Qwen2 saved as a single model.safetensors; returns (folder, HF state dict)."""
  path = tmp_path_factory.mktemp("qwen")
  hf = save_tiny_hf(path, "qwen2", seed=7)
  return path, {k: v.detach().numpy() for k, v in hf.state_dict().items()}


def _copy(src, tmp_path):
  dst = tmp_path / "copy"
  shutil.copytree(src, dst)
  return dst


def test_sharded_safetensors_into_sharded_mesh(tmp_path):
  hf = save_tiny_hf(tmp_path, "llama", seed=3, max_shard_size="20KB", tie_word_embeddings=True)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  mesh = make_mesh(MeshConfig(2, 2, 2))
  model, cfg = load_hf(tmp_path, mesh=mesh)
  specs = param_specs(model)
  assert specs["layers.1.mlp.up_proj.kernel"] == P("fsdp", "tensor")
  assert specs["embed.embedding"] == P("tensor", "fsdp")
  assert model.lm_head is None
  tokens, positions, mask = padded_batch(np.random.default_rng(0), cfg.vocab_size, 4, 10, "left")
  ref = hf_logits(hf, tokens, positions, mask)
  graphdef, state = nnx.split(model)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda s, *b: nnx.merge(graphdef, s)(*b))(state, tokens, positions, mask)
  assert np.abs(np.asarray(out) - ref)[mask > 0].max() < PARITY_TOL


@pytest.mark.parametrize("tied", [False, True])
def test_params_to_hf_round_trip_is_exact(tmp_path, tied):
  hf = save_tiny_hf(tmp_path, "qwen2", seed=4, tie_word_embeddings=tied)
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  model, cfg = load_hf(tmp_path)
  out = list(params_to_hf(model, cfg))
  names = [n for n, _ in out]
  assert names == hf_names(cfg)
  assert ("lm_head.weight" in names) == (not tied)
  assert set(names) == set(sd) - ({"lm_head.weight"} if tied else set())
  for name, arr in out:
    assert arr.shape == sd[name].shape and arr.dtype == np.float32, name
    np.testing.assert_array_equal(arr, sd[name], err_msg=name)
  # and from an nnx.State of a sharded model, gathered per tensor
  mesh = make_mesh(MeshConfig(1, 4, 2))
  sharded, _ = load_hf(tmp_path, mesh=mesh)
  for (name, arr), (_, ref) in zip(params_to_hf(nnx.state(sharded), cfg), out):
    np.testing.assert_array_equal(arr, ref, err_msg=name)


def test_name_map_is_a_bijection(qwen_dir):
  _, sd = qwen_dir
  for name in sd:
    path, transform = hf_to_ours(name)
    assert ours_to_hf(path) == (name, transform)
    assert transform == ("transpose" if name.endswith("proj.weight") else "identity")


def test_bf16_params_and_tensor_iterator(qwen_dir):
  path, sd = qwen_dir
  model, cfg = load_hf(path, param_dtype="bfloat16", compute_dtype="bfloat16")
  assert cfg.param_dtype == "bfloat16" and cfg.compute_dtype == "bfloat16"
  assert model.layers[0].attn.q_proj.kernel[...].dtype == jax.numpy.bfloat16
  # load_from_hf_tensors takes any (name, array) iterator, e.g. the GGUF reader's
  model2 = load_from_hf_tensors(cfg.replace(param_dtype="float32"), iter(sd.items()))
  np.testing.assert_array_equal(model2.layers[1].mlp.down_proj.kernel[...],
                                sd["model.layers.1.mlp.down_proj.weight"].T)


def _rewrite(folder, edit):
  tensors = load_file(str(folder / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(folder / "model.safetensors"))


def test_missing_tensor_error(qwen_dir, tmp_path):
  folder = _copy(qwen_dir[0], tmp_path)
  _rewrite(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
  with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.self_attn\."
                                            r"k_proj\.bias"):
    load_hf(folder)


def test_unexpected_tensor_error_and_non_strict(qwen_dir, tmp_path):
  folder = _copy(qwen_dir[0], tmp_path)
  _rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.ones(3,
                                                                                          "f4")}))
  with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\."
                                            r"extra\.weight'"):
    load_hf(folder)
  load_hf(folder, strict=False)  # skipped with a warning
  # a real decoder name the configured model lacks (layer 5 of a 2-layer model)
  def layer5(t):
    t.pop("model.layers.0.self_attn.extra.weight")
    t["model.layers.5.mlp.up_proj.weight"] = np.ones((2, 2), "f4")
  _rewrite(folder, layer5)
  with pytest.raises(CheckpointError, match=r"model\.layers\.5\.mlp\.up_proj\.weight.*"
                                            r"num_layers=2"):
    load_hf(folder)


def test_shape_mismatch_error(qwen_dir, tmp_path):
  folder = _copy(qwen_dir[0], tmp_path)
  cfg = json.loads((folder / "config.json").read_text())
  cfg["intermediate_size"] = 80
  (folder / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.\d\.mlp\.\w+_proj\.weight' "
                                            r"has shape \((96, 64|64, 96)\), expected "
                                            r"\((80, 64|64, 80)\)"):
    load_hf(folder)


def test_unsupported_architecture_and_rope_errors(qwen_dir, tmp_path):
  folder = _copy(qwen_dir[0], tmp_path)
  cfg = json.loads((folder / "config.json").read_text())
  bad = dict(cfg, model_type="mistral", architectures=["MistralForCausalLM"])
  (folder / "config.json").write_text(json.dumps(bad))
  with pytest.raises(ConfigError, match=r"config\.json: model_type='mistral'.*unsupported "
                                        r"architecture; expected model_type 'qwen2' or 'llama'"):
    load_hf(folder)
  bad = dict(cfg, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
  (folder / "config.json").write_text(json.dumps(bad))
  with pytest.raises(ConfigError, match=r"rope_parameters\.rope_type='yarn': unsupported rope "
                                        r"type; expected 'llama3' or 'default'"):
    load_hf(folder)
  bad = dict(cfg, rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "linear",
                                                                      "factor": 2.0})
  (folder / "config.json").write_text(json.dumps(bad))
  with pytest.raises(ConfigError, match=r"rope_scaling\.rope_type='linear'"):
    load_hf(folder)


def test_missing_weights_file_error(qwen_dir, tmp_path):
  folder = _copy(qwen_dir[0], tmp_path)
  (folder / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match="neither model.safetensors nor "
                                            "model.safetensors.index.json"):
    load_hf(folder)


def test_load_tokenizer(tmp_path):
  save_tiny_tokenizer(tmp_path, "chatml")
  tok = load_tokenizer(tmp_path)
  assert tok.eos_token == "<|im_end|>"
  ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
  assert len(ids) > 0
