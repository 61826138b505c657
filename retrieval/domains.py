"""Retrieval within each turn's domain (MTRAG-style corpora; `retrieval.within_domain`).

`rows_by_domain` groups a collection's rows by passage domain; one searcher is built per group.
`TurnRanker` is a `GoldRanker` that finds each query's domain from its qid (the turn's domain),
so callers that pass qids (the reward, the SDPW filter, evaluation) need no domains of their own.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from retrieval.gold_rank import GoldRanker
from retrieval.searcher import Searcher


def rows_by_domain(domains: Sequence[str | None],
                   ids: Sequence[str]) -> dict[str, np.ndarray] | None:
  """{domain: rows [n_d] int64, ascending}, domains sorted; None when no passage has a domain.

  Raises ValueError when some passages have a domain and others do not.
  """
  by: dict[str, list[int]] = {}
  missing = []
  for row, d in enumerate(domains):
    if d is None:
      missing.append(row)
    else:
      by.setdefault(d, []).append(row)
  if not by:
    return None
  if missing:
    raise ValueError(f"{len(missing)} passages have no domain (e.g. {ids[missing[0]]!r}) while "
                     f"others do ({sorted(by)}): give every passage a domain, or set "
                     "retrieval.within_domain=false")
  return {d: np.asarray(by[d], np.int64) for d in sorted(by)}


class TurnRanker(GoldRanker):
  """A GoldRanker whose queries may be named by qid.

  With one searcher per domain, a query named by qid is searched in `qid_domain[qid]` (its turn's
  domain); explicit `domains=` still win. With a single searcher it is a plain GoldRanker.

  Args:
    searcher: a Searcher, or {domain: Searcher}.
    qrels: as GoldRanker.
    qid_domain: {qid: domain} of the turns this ranker serves.
    **kw: GoldRanker's k, max_query_words, min_relevance.
  """

  def __init__(self, searcher: Searcher | Mapping[str, Searcher], qrels,
               qid_domain: Mapping[str, str | None], **kw):
    super().__init__(searcher, qrels, **kw)
    self.qid_domain = dict(qid_domain)
    if self.searchers is not None:
      bad = {q: d for q, d in self.qid_domain.items() if d not in self.searchers}
      if bad:
        q, d = next(iter(bad.items()))
        raise ValueError(f"{len(bad)} turns have a domain without passages, e.g. {q!r} "
                         f"(domain {d!r}; passage domains: {sorted(self.searchers)}); give each "
                         "conversation its domain, or set retrieval.within_domain=false")

  def domains_of(self, qids: Sequence[str]) -> list[str | None] | None:
    """Each qid's domain (None for an unknown qid); None with a single searcher."""
    if self.searchers is None:
      return None
    return [self.qid_domain.get(str(q)) for q in qids]

  def search_ranked(self, texts: Sequence[str | None], k: int | None = None,
                    domains: Sequence[str] | None = None,
                    qids: Sequence[str] | None = None) -> list[list[str]]:
    """GoldRanker.search_ranked; `qids=` (one per text) pick each text's domain."""
    if domains is None and qids is not None:
      if len(qids) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(qids)} qids")
      domains = self.domains_of(qids)
    return super().search_ranked(texts, k, domains)

  def ranks(self, texts: Sequence[str | None], qids: Sequence[str],
            domains: Sequence[str] | None = None) -> np.ndarray:
    """GoldRanker.ranks, each query searched in its qid's domain."""
    if domains is None and len(texts) == len(qids):
      domains = self.domains_of(qids)
    return super().ranks(texts, qids, domains)
