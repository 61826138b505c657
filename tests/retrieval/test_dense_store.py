"""Corpus encoding into embedding shards: manifest, memory-mapped reload, resume, bad input."""

import json
import os

import numpy as np
import pytest

from retrieval.dense import EmbeddingStore, encode_corpus, searcher_from_store
from retrieval.dense_encoder import DenseEncoder
from tests.retrieval.test_dense_encoder import TEXTS, minilm_path


@pytest.fixture(scope="module")
def encoder():
  return DenseEncoder.from_hf(minilm_path(), pooling="mean_norm", max_length=32, batch_size=4)


def test_encode_corpus_shards_and_reload(tmp_path, encoder):
  ids = [f"doc {i}" for i in range(len(TEXTS))]  # ids may contain spaces
  store = encode_corpus(encoder, TEXTS, ids, tmp_path, shard_size=4, progress=False)
  m = json.load(open(tmp_path / "manifest.json"))
  assert [s["rows"] for s in m["shards"]] == [4, 2] and m["dim"] == 384
  assert isinstance(store.shards[0], np.memmap)
  assert store.ids == ids and len(store) == len(TEXTS)
  np.testing.assert_allclose(store.array(), encoder.encode(TEXTS), atol=1e-6)
  np.testing.assert_array_equal(store.rows(3, 5), store.array()[3:5])
  rows, _ = searcher_from_store(encoder, tmp_path).search(["the duke built a castle"], 2)
  assert store.ids[rows[0, 0]] == "doc 1"


def test_resume_reuses_finished_shards(tmp_path, encoder):
  ids = [f"d{i}" for i in range(len(TEXTS))]
  encode_corpus(encoder, TEXTS, ids, tmp_path, shard_size=4, progress=False)
  first = tmp_path / "emb-00000.npy"
  mtime = os.stat(first).st_mtime_ns
  os.remove(tmp_path / "emb-00001.npy")  # interrupted run
  store = encode_corpus(encoder, TEXTS, ids, tmp_path, shard_size=4, progress=False)
  assert os.stat(first).st_mtime_ns == mtime and len(store) == len(TEXTS)
  # other ids for the same rows: the shard is re-encoded
  encode_corpus(encoder, TEXTS, [f"x{i}" for i in range(len(TEXTS))], tmp_path, shard_size=4,
                progress=False)
  assert os.stat(first).st_mtime_ns != mtime


def test_bad_inputs(tmp_path, encoder):
  with pytest.raises(ValueError, match="empty corpus"):
    encode_corpus(encoder, [], [], tmp_path, progress=False)
  with pytest.raises(ValueError, match="duplicate passage id 'a' \\(row 2\\)"):
    encode_corpus(encoder, TEXTS[:3], ["a", "b", "a"], tmp_path, progress=False)
  with pytest.raises(ValueError, match="3 texts but 2 ids"):
    encode_corpus(encoder, TEXTS[:3], ["a", "b"], tmp_path, progress=False)
  encode_corpus(encoder, TEXTS[:3], ["a", "b", "c"], tmp_path, progress=False)
  np.save(tmp_path / "emb-00000.npy", np.zeros((2, 384), np.float32))
  with pytest.raises(ValueError, match="emb-00000.npy: shape"):
    EmbeddingStore.load(tmp_path)
