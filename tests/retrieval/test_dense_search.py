"""Exact dense top-k: equals a brute-force numpy search, chunked == unchunked, 8 devices == 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from retrieval.dense_search import DenseSearcher, chunk_topk

SCORE_TOL = 1e-5  # f32 dot products of unit vectors, different summation orders


def _data(n=1003, d=24, q=37, seed=0):
  rng = np.random.default_rng(seed)
  c = rng.standard_normal((n, d)).astype(np.float32)
  qs = rng.standard_normal((q, d)).astype(np.float32)
  return c, qs, [f"p{i}" for i in range(n)]


def _brute(c, q, k):
  s = q.astype(np.float64) @ c.astype(np.float64).T
  rows = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return rows, np.take_along_axis(s, rows, axis=1)


def _mesh8():
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


@pytest.mark.parametrize("k", [1, 10, 100])
def test_chunked_search_equals_brute_force(k):
  c, q, ids = _data()
  rows, scores = DenseSearcher(None, c, ids, chunk_size=128).search_embeddings(q, k)
  ref_rows, ref_scores = _brute(c, q, k)
  assert rows.dtype == np.int64 and rows.shape == (len(q), k)
  np.testing.assert_array_equal(rows, ref_rows)
  np.testing.assert_allclose(scores, ref_scores, atol=SCORE_TOL, rtol=0)


def test_chunked_equals_unchunked_and_shards_equal_array():
  c, q, ids = _data(n=3000)
  whole = DenseSearcher(None, c, ids, chunk_size=1 << 20).search_embeddings(q, 20)
  for chunk in (16, 100, 1024):
    got = DenseSearcher(None, c, ids, chunk_size=chunk).search_embeddings(q, 20)
    np.testing.assert_array_equal(got[0], whole[0])
  shards = [c[:700], c[700:701], c[701:]]
  got = DenseSearcher(None, shards, ids, chunk_size=256).search_embeddings(q, 20)
  np.testing.assert_array_equal(got[0], whole[0])
  np.testing.assert_allclose(got[1], whole[1], atol=SCORE_TOL, rtol=0)


def test_sharded_8_devices_equals_1_device():
  assert len(jax.devices()) >= 8, "tests/conftest.py sets 8 fake CPU devices"
  c, q, ids = _data(n=2053, q=70)
  one = DenseSearcher(None, c, ids, chunk_size=64).search_embeddings(q, 50)
  s8 = DenseSearcher(None, c, ids, mesh=_mesh8(), chunk_size=64)
  assert len(s8.chunks.sharding.device_set) == 8
  eight = s8.search_embeddings(q, 50)
  np.testing.assert_array_equal(eight[0], one[0])
  np.testing.assert_allclose(eight[1], one[1], atol=SCORE_TOL, rtol=0)
  np.testing.assert_array_equal(eight[0], _brute(c, q, 50)[0])


def test_two_stage_chunk_topk_equals_plain_topk():
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.standard_normal((9, 16 * 512)).astype(np.float32))
  for k in (1, 7, 100):
    v, i = chunk_topk(s, k)
    v0, i0 = jax.lax.top_k(s, k)
    np.testing.assert_array_equal(np.asarray(i), np.asarray(i0))
    np.testing.assert_array_equal(np.asarray(v), np.asarray(v0))
  # heavy ties: values must still be the exact top-k multiset
  t = jnp.asarray(rng.integers(0, 5, (9, 16 * 512)).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(chunk_topk(t, 100)[0]),
                                np.asarray(jax.lax.top_k(t, 100)[0]))


def test_k_larger_than_corpus_pads():
  c, q, ids = _data(n=5, q=3)
  rows, scores = DenseSearcher(None, c, ids, mesh=_mesh8()).search_embeddings(q, 8)
  np.testing.assert_array_equal(rows[:, :5], _brute(c, q, 5)[0])
  assert (rows[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()


def test_search_texts_with_minilm():
  from tests.retrieval.test_dense_encoder import TEXTS, minilm_path
  from retrieval.dense_encoder import DenseEncoder
  enc = DenseEncoder.from_hf(minilm_path(), pooling="mean_norm", max_length=32, batch_size=8)
  passages = TEXTS + ["castles of the middle ages", "population of northern towns"]
  emb = enc.encode(passages)
  searcher = DenseSearcher(enc, emb, [f"d{i}" for i in range(len(passages))])
  queries = ["when was the castle built", "who is the author of the book"]
  rows, scores = searcher.search(queries, 3)
  ref_rows, ref_scores = _brute(emb, enc.encode(queries), 3)
  np.testing.assert_array_equal(rows, ref_rows)
  np.testing.assert_allclose(scores, ref_scores, atol=SCORE_TOL)
  assert searcher.ids[rows[0, 0]] == "d1"  # "the castle was built in 1320 by the duke"
  rows, _ = searcher.search(["", "?"], 3)  # degenerate queries still get ranked lists
  assert (rows >= 0).all()


def test_bad_inputs():
  c, q, ids = _data(n=10)
  with pytest.raises(ValueError, match="empty corpus"):
    DenseSearcher(None, c[:0], [])
  with pytest.raises(ValueError, match="duplicate passage id 'p3'"):
    DenseSearcher(None, c, ids[:9] + ["p3"])
  with pytest.raises(ValueError, match="10 embeddings"):
    DenseSearcher(None, c, ids[:9])
  with pytest.raises(ValueError, match=r"\[Q, 24\]"):
    DenseSearcher(None, c, ids).search_embeddings(q[:, :5], 3)


def test_pruned_path_equals_brute_force():
  c, q, ids = _data(n=20000, d=16, q=64)
  s = DenseSearcher(None, c, ids, chunk_size=2048, prune=True)
  assert s.chunk // 16 >= 64  # pruned_scan is used
  for k in (10, 100):
    rows, scores = s.search_embeddings(q, k)
    ref_rows, ref_scores = _brute(c, q, k)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, atol=SCORE_TOL, rtol=0)


def test_pruned_scan_rescores_chunks_with_clustered_hits():
  """Hits of query 0 packed in one chunk, spread over many blocks: pass 2 must rescore it."""
  from retrieval.dense_search import pruned_scan
  c, q, _ = _data(n=16 * 1024, d=16, q=8)
  c[5000:5000 + 16 * 150:16] += 10.0 * q[0] / np.linalg.norm(q[0])  # 150 blocks
  chunks = jnp.asarray(c.reshape(16, 1024, 16))
  starts = jnp.arange(16, dtype=jnp.int32) * 1024
  (v, r), redo = pruned_scan(jnp.asarray(q), chunks, starts, len(c), 100, return_stats=True)
  assert np.asarray(redo)[[5, 6]].all()  # 64 hit blocks each; chunks 4, 7 hold <= KEEP
  ref_rows, ref_scores = _brute(c, q, 100)
  np.testing.assert_array_equal(np.asarray(r), ref_rows)
  np.testing.assert_allclose(np.asarray(v), ref_scores, atol=SCORE_TOL, rtol=0)


def test_pruned_sharded_8_devices_equals_brute_force():
  c, q, ids = _data(n=8 * 4096, d=16, q=16)
  s8 = DenseSearcher(None, c, ids, mesh=_mesh8(), chunk_size=4096, prune=True)
  rows, scores = s8.search_embeddings(q, 10)
  ref_rows, ref_scores = _brute(c, q, 10)
  np.testing.assert_array_equal(rows, ref_rows)
  np.testing.assert_allclose(scores, ref_scores, atol=SCORE_TOL, rtol=0)


def test_equal_scores_ordered_by_passage_id():
  """Duplicate passages (identical embeddings) come back in passage id order (searcher.py)."""
  c, q, _ = _data(n=40, q=4)
  c[[3, 17, 25]] = 5.0 * q[0] / np.linalg.norm(q[0])  # the same best passage three times
  ids = [f"x{i:02d}" for i in range(40)]
  ids[3], ids[17], ids[25] = "dup-c", "dup-a", "dup-b"
  rows, scores = DenseSearcher(None, c, ids, mesh=_mesh8()).search_embeddings(q, 5)
  assert [ids[r] for r in rows[0, :3]] == ["dup-a", "dup-b", "dup-c"]
  assert scores.dtype == np.float64 and scores[0, 0] == scores[0, 2]
