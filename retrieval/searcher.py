"""The interface every retriever (BM25, dense) offers to the gold ranker and to evaluation.

Result layout: `rows` int64 [Q, k] (row = index into `ids`) and `scores` float64 [Q, k], best
first. A query with fewer than k hits is padded with row -1 and score -inf. Ties are broken by
passage id ascending (string order), which is what pyserini/Anserini do (method.md 4.2); a
retriever precomputes `id_order` (the rank of each row's id in sorted id order) for that.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Searcher(Protocol):
  """Top-k retrieval over a fixed passage set.

  ids: row -> passage id.
  search(queries, k) -> (rows int64 [Q, k], scores float64 [Q, k]); padding row -1 / score -inf.
  """

  ids: Sequence[str]

  def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]: ...


def id_order(ids: Sequence[str]) -> np.ndarray:
  """rank_r [N] int32: position of row r's id in lexicographic (code point) id order."""
  order = np.argsort(np.asarray(list(ids), dtype=str), kind="stable")
  rank = np.empty(len(ids), np.int32)
  rank[order] = np.arange(len(ids), dtype=np.int32)
  return rank


def top_k(scores_n: np.ndarray, rows_n: np.ndarray, tie_n: np.ndarray,
          k: int) -> tuple[np.ndarray, np.ndarray]:
  """The k best of n candidates: score descending, then tie key ascending.

  Args:
    scores_n: candidate scores [n].
    rows_n: candidate rows [n].
    tie_n: tie keys [n] (smaller wins among equal scores).
    k: how many to keep; fewer come back when n < k.
  Returns:
    (rows [m], scores [m]) with m = min(n, k), best first.
  """
  n = scores_n.shape[0]
  if n > k:
    kth = np.partition(scores_n, n - k)[n - k]  # the k-th largest score
    keep = np.flatnonzero(scores_n >= kth)  # includes every tie at the boundary
    scores_n, rows_n, tie_n = scores_n[keep], rows_n[keep], tie_n[keep]
  order = np.lexsort((tie_n, -scores_n))[:k]
  return rows_n[order], scores_n[order]


def top_k_dense(scores_n: np.ndarray, tie_n: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
  """The k best non-zero entries of a dense score vector [n] (zero = not a hit).

  Returns (indices int64 [m], scores [m]), m <= k, score descending then tie key ascending.
  """
  n = scores_n.shape[0]
  kth = np.partition(scores_n, n - k)[n - k] if n > k else 0.0
  cand = np.flatnonzero(scores_n >= kth) if kth > 0 else np.flatnonzero(scores_n)
  return top_k(scores_n[cand], cand, tie_n[cand], k)


def pad_results(results: Sequence[tuple[np.ndarray, np.ndarray]],
                k: int) -> tuple[np.ndarray, np.ndarray]:
  """Stacks per-query (rows, scores) into [Q, k] arrays padded with -1 / -inf."""
  rows_qk = np.full((len(results), k), -1, np.int64)
  scores_qk = np.full((len(results), k), -np.inf, np.float64)
  for i, (r, s) in enumerate(results):
    rows_qk[i, :len(r)] = r
    scores_qk[i, :len(s)] = s
  return rows_qk, scores_qk
