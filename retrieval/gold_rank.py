"""Rank of the best-ranked gold passage, the input of the GRPO reward (method.md 4.1-4.2).

For each (rewrite, qid): truncate the rewrite to its first `max_query_words` whitespace tokens
(1,024 at reward time, 512 at evaluation: method.md 4.2, 5.2), retrieve the top k (100), and
return the 1-based position of the first passage whose qrels grade is >= 1, or -1 when no gold is
in the top k. Empty or all-stopword queries retrieve nothing and get -1.

MTRAG-style data retrieves within the conversation's domain: pass a {domain: Searcher} mapping
(one index per domain corpus) and `domains=` per query.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from retrieval.searcher import Searcher

if TYPE_CHECKING:
  from cqr_jax.data.types import Qrels

NOT_FOUND = -1


def truncate_words(text: str, max_words: int) -> str:
  """The first `max_words` whitespace-separated tokens, joined by single spaces."""
  return " ".join(text.split()[:max_words])


class GoldRanker:
  """Gold-passage ranks for batches of rewrites.

  Args:
    searcher: a Searcher, or {domain: Searcher} when queries carry a domain.
    qrels: {qid: {passage id: grade}}; grades >= min_relevance are golds.
    k: depth of the retrieved list (method.md 4.2: 100).
    max_query_words: whitespace-token cap on the query (method.md 4.2: 1,024).
  """

  def __init__(self, searcher: Searcher | Mapping[str, Searcher], qrels: Qrels, k: int = 100,
               max_query_words: int = 1024, min_relevance: int = 1):
    if k <= 0 or max_query_words <= 0:
      raise ValueError(f"k and max_query_words must be positive, got {k}, {max_query_words}")
    self.searchers = dict(searcher) if isinstance(searcher, Mapping) else None
    self.searcher = None if self.searchers is not None else searcher
    self.k = k
    self.max_query_words = max_query_words
    self.golds = {q: frozenset(p for p, g in d.items() if g >= min_relevance)
                  for q, d in qrels.items()}

  def _groups(self, n: int, domains: Sequence[str] | None):
    """Yields (searcher, query indices) per domain (or one group without domains)."""
    if self.searchers is None:
      if domains is not None:
        raise ValueError("domains given but the ranker has a single searcher")
      yield self.searcher, np.arange(n)
      return
    if domains is None or len(domains) != n:
      raise ValueError(f"this ranker has one searcher per domain ({sorted(self.searchers)}): "
                       f"pass domains= with one domain per query ({n})")
    by: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
      if d not in self.searchers:
        raise ValueError(
            f"query {i}: domain {d!r} has no searcher (known: {sorted(self.searchers)})")
      by.setdefault(d, []).append(i)
    for d, idx in by.items():
      yield self.searchers[d], np.asarray(idx)

  def search_ranked(self, texts: Sequence[str | None], k: int | None = None,
                    domains: Sequence[str] | None = None) -> list[list[str]]:
    """Top-k passage ids per text (after truncation), best first; None texts get []."""
    k = self.k if k is None else k
    out: list[list[str]] = [[] for _ in texts]
    for searcher, idx in self._groups(len(texts), domains):
      live = [i for i in idx.tolist() if texts[i] is not None]
      if not live:
        continue
      rows, _ = searcher.search([truncate_words(texts[i], self.max_query_words) for i in live], k)
      ids = searcher.ids
      take = getattr(ids, "take", None)  # a batch lookup (index_io.MappedLines)
      for i, r in zip(live, rows.tolist()):
        out[i] = take([x for x in r if x >= 0]) if take else [ids[x] for x in r if x >= 0]
    return out

  def ranks(self, texts: Sequence[str | None], qids: Sequence[str],
            domains: Sequence[str] | None = None) -> np.ndarray:
    """ranks [Q] int32: 1-based rank of the best-ranked gold in the top k, or -1.

    A text of None (no rewrite could be extracted) gets -1 without a search.
    Raises DataError for a qid without qrels.
    """
    if len(texts) != len(qids):
      raise ValueError(f"{len(texts)} texts but {len(qids)} qids")
    missing = [q for q in qids if q not in self.golds]
    if missing:
      # Imported here: cqr_jax.data's package __init__ pulls in jax, which BM25 users don't need.
      from cqr_jax.data.types import DataError
      raise DataError(f"{len(missing)} query id(s) have no qrels, e.g. {missing[:3]!r} "
                      f"(the reward needs the train split's qrels: method.md 4.2)")
    out = np.full(len(texts), NOT_FOUND, np.int32)
    for i, ranked in enumerate(self.search_ranked(texts, domains=domains)):
      gold = self.golds[qids[i]]
      for r, pid in enumerate(ranked):
        if pid in gold:
          out[i] = r + 1
          break
    return out
