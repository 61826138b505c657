"""Gold-passage rank (method.md 4.1-4.2) against a brute-force ranking of rank_bm25's scores."""

import numpy as np
import pytest

from cqr_jax.data.types import DataError
from retrieval.bm25 import RankBM25Searcher, build_bm25
from retrieval.gold_rank import GoldRanker, truncate_words


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(3)
  words = [f"t{i}" for i in range(80)] + ["the", "and"]
  p = 1.0 / np.arange(1, len(words) + 1)
  p /= p.sum()
  texts = [" ".join(rng.choice(words, size=rng.integers(3, 30), p=p)) for _ in range(300)]
  ids = [f"doc-{i}" for i in range(300)]
  queries = [" ".join(rng.choice(words, size=rng.integers(1, 12), p=p)) for _ in range(60)]
  qids = [f"q{i}" for i in range(60)]
  qrels = {}
  for q in qids:  # 1-3 golds, sometimes a grade-0 judgement, sometimes a gold never retrieved
    golds = rng.choice(300, size=rng.integers(1, 4), replace=False)
    qrels[q] = {ids[g]: int(rng.integers(1, 3)) for g in golds}
    qrels[q][ids[int(rng.integers(300))]] = 0
  return texts, ids, queries, qids, qrels


def _brute_rank(scores_n, ids, golds, k):
  order = sorted((r for r in range(len(ids)) if scores_n[r] != 0),
                 key=lambda r: (-scores_n[r], ids[r]))
  for pos, r in enumerate(order[:k]):
    if ids[r] in golds:
      return pos + 1
  return -1


@pytest.mark.parametrize("k", [100, 7])
def test_ranks_match_brute_force(setup, k):
  texts, ids, queries, qids, qrels = setup
  ref = RankBM25Searcher(texts, ids)
  ranker = GoldRanker(build_bm25(texts, ids, kind="okapi", show_progress=False), qrels, k=k)
  got = ranker.ranks(queries, qids)
  assert got.dtype == np.int32
  want = [_brute_rank(ref.bm25.get_scores(q.lower().split()), ids,
                      {p for p, g in qrels[qid].items() if g >= 1}, k)
          for q, qid in zip(queries, qids)]
  assert got.tolist() == want
  assert (got == -1).any() and (got > 0).any()
  np.testing.assert_array_equal(GoldRanker(ref, qrels, k=k).ranks(queries, qids), got)


def test_search_ranked_returns_ids(setup):
  texts, ids, queries, _, qrels = setup
  idx = build_bm25(texts, ids, kind="okapi", show_progress=False)
  ranked = GoldRanker(idx, qrels).search_ranked(queries[:3], k=5)
  rows, _ = idx.search(queries[:3], 5)
  assert ranked == [[ids[r] for r in row if r >= 0] for row in rows.tolist()]


def test_qid_without_qrels_is_an_error(setup):
  texts, ids, queries, _, qrels = setup
  ranker = GoldRanker(build_bm25(texts, ids, kind="okapi", show_progress=False), qrels)
  with pytest.raises(DataError, match="no qrels.*'nope'"):
    ranker.ranks(queries[:2], ["q0", "nope"])


def test_empty_and_stopword_queries_are_not_found():
  texts = ["the cat sat on the mat", "a dog ran", "cats and dogs"]
  ids = ["a", "b", "c"]
  ranker = GoldRanker(build_bm25(texts, ids, kind="lucene", show_progress=False),
                      {"q": {"a": 1}})
  assert ranker.ranks(["", "the and of", "  ", None, "mat"], ["q"] * 5).tolist() == [
      -1, -1, -1, -1, 1]


def test_query_truncated_to_max_words():
  texts, ids = ["alpha beta", "gamma delta"], ["x", "y"]
  idx = build_bm25(texts, ids, kind="lucene", show_progress=False)
  query = "zzz " * 5 + "gamma"
  assert GoldRanker(idx, {"q": {"y": 1}}, max_query_words=6).ranks([query], ["q"]).tolist() == [1]
  assert GoldRanker(idx, {"q": {"y": 1}}, max_query_words=5).ranks([query], ["q"]).tolist() == [-1]
  assert truncate_words("  a\tb\n c  d ", 3) == "a b c"


def test_per_domain_searchers():
  fin = build_bm25(["stock market", "bond yield"], ["f1", "f2"], kind="lucene", show_progress=False)
  gov = build_bm25(["tax form", "market rules"], ["g1", "g2"], kind="lucene", show_progress=False)
  ranker = GoldRanker({"fiqa": fin, "govt": gov}, {"a": {"f1": 1}, "b": {"g2": 1}})
  got = ranker.ranks(["market", "market", "market"], ["a", "b", "a"],
                     domains=["fiqa", "govt", "govt"])
  assert got.tolist() == [1, 1, -1]
  with pytest.raises(ValueError, match="domains="):
    ranker.ranks(["market"], ["a"])
  with pytest.raises(ValueError, match="'cloud' has no searcher"):
    ranker.ranks(["market"], ["a"], domains=["cloud"])
