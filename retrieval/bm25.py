"""BM25 over an inverted index held as term-major posting arrays (method.md 4.2, 5.2).

Two scorers share one index layout (docs/retrieval.md):
- `ExactOkapiBM25`: rank_bm25.BM25Okapi's scores bit for bit (same idf with its floor of
  epsilon * mean idf for negative idf, same float64 operations in the same order).
- `LuceneBM25`: Lucene 8+/pyserini BM25: idf log(1 + (N - n + 0.5) / (n + 0.5)), document
  length stored lossily in one byte (SmallFloat), float32 term scores summed in float64.
`RankBM25Searcher` wraps rank_bm25 itself: the reference, and a backend for small corpora.

Search, per query and shard: each query term's posting list is added into a reused score buffer
(term at a time, in query order); only the rows the postings touched are then scored and
partitioned for the top k (numpy only; `search_dense`, the dense-vector path, is the reference).
A document with score exactly 0 (no query term) is never returned: results are padded with
row -1 / score -inf instead. Ties: passage id ascending (`searcher.id_order`), as pyserini does.
Large corpora are split into document shards of < 2**31 postings (int32 offsets); their top-k
lists merge exactly.
"""

from __future__ import annotations

import array
import dataclasses
import math
import os
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from retrieval import searcher as searcher_lib
from retrieval.analyzer import Analyzer, get_analyzer

# (k1, b) the paper uses with Lucene BM25 (method.md 4.2).
TOPIOCQA_K1_B = (0.9, 0.4)
QRECC_K1_B = (0.82, 0.68)


@dataclasses.dataclass(frozen=True)
class BM25Params:
  """kind: "lucene" or "okapi". Defaults: Lucene with TopiOCQA's k1/b and the English analyzer;
  `okapi_params()` gives rank_bm25.BM25Okapi's defaults."""
  kind: str = "lucene"
  k1: float = TOPIOCQA_K1_B[0]
  b: float = TOPIOCQA_K1_B[1]
  epsilon: float = 0.25  # okapi only: negative idf -> epsilon * mean idf
  analyzer: str = "lucene_english"

  def __post_init__(self):
    if self.kind not in ("lucene", "okapi"):
      raise ValueError(f"BM25 kind must be 'lucene' or 'okapi', got {self.kind!r}")


def okapi_params(k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25,
                 analyzer: str = "whitespace_lower") -> BM25Params:
  return BM25Params(kind="okapi", k1=k1, b=b, epsilon=epsilon, analyzer=analyzer)


# ----------------------------------------------------------------------------------------------
# Lucene's one-byte length norm (org.apache.lucene.util.SmallFloat.intToByte4 / byte4ToInt):
# lengths below 24 are exact; above, a float with 4 significant bits.
_NUM_FREE = 24


def _long_to_int4(x: int) -> int:
  bits = x.bit_length()
  if bits < 4:
    return x
  shift = bits - 4
  return ((x >> shift) & 0x07) | ((shift + 1) << 3)


def _int4_to_long(i: int) -> int:
  shift = (i >> 3) - 1
  return i & 0x07 if shift == -1 else ((i & 0x07) | 0x08) << shift


def length_to_byte(length: int) -> int:
  return length if length < _NUM_FREE else _NUM_FREE + _long_to_int4(length - _NUM_FREE)


def byte_to_length(byte: int) -> int:
  return byte if byte < _NUM_FREE else min(_NUM_FREE + _int4_to_long(byte - _NUM_FREE), 2**31 - 1)


# Decoded length of each byte, and the byte of every length up to 2**16 (longer: computed).
LENGTH_TABLE = np.array([byte_to_length(i) for i in range(256)], np.float32)
_SMALL_BYTES = np.array([length_to_byte(n) for n in range(1 << 16)], np.uint8)


def encode_lengths(doc_len: np.ndarray) -> np.ndarray:
  """norm byte per document [N] uint8 (Lucene's SmallFloat.intToByte4)."""
  out = _SMALL_BYTES[np.minimum(doc_len, (1 << 16) - 1)]
  for i in np.flatnonzero(doc_len >= (1 << 16)):
    out[i] = length_to_byte(int(doc_len[i]))
  return out


# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Shard:
  """Postings of documents [start, start + num_docs) as a term-major CSR matrix.

  indptr [V + 1] int32, rows [P] int32 (local row), tf [P] (uint16 or int32),
  value [P]: okapi: float64 idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl));
  lucene: float32 score of one query occurrence, idf - idf / (1 + tf * normInverse).
  """
  start: int
  num_docs: int
  indptr: np.ndarray
  rows: np.ndarray
  tf: np.ndarray
  value: np.ndarray


def _check_corpus(texts: Sequence[str], ids: Sequence[str]) -> None:
  if len(texts) == 0:
    raise ValueError("cannot build a BM25 index over an empty corpus (0 passages)")
  if len(texts) != len(ids):
    raise ValueError(f"{len(texts)} passages but {len(ids)} ids")
  seen: dict[str, int] = {}
  for row, pid in enumerate(ids):
    if not isinstance(pid, str):
      raise ValueError(f"passage id at row {row} is {type(pid).__name__}, not str: {pid!r}")
    if pid in seen:
      raise ValueError(f"duplicate passage id {pid!r} at rows {seen[pid]} and {row}")
    seen[pid] = row


def invert(texts: Iterable[str], num_docs: int, analyzer: Analyzer, show_progress: bool = True,
           chunk_docs: int = 1 << 16):
  """Tokenises every text and builds the postings.

  Returns:
    vocab: term -> id, in order of first occurrence (rank_bm25's idf order).
    doc_len [N] int64: tokens per document.
    indptr [V + 1] int64, rows [P] int32, tf [P] int32: postings, term-major, rows ascending.
  """
  vocab: dict[str, int] = {}
  doc_len = np.zeros(num_docs, np.int64)
  chunks = []  # per chunk of documents: (term [p], row [p], tf [p]) sorted by (term, row)
  flat = array.array("q")
  start = row = 0

  def flush(end: int):
    n = end - start
    t = np.frombuffer(flat, np.int64) if len(flat) else np.zeros(0, np.int64)
    local = np.repeat(np.arange(n, dtype=np.int64), doc_len[start:end])
    keys, counts = np.unique(t * n + local, return_counts=True)
    chunks.append(((keys // n).astype(np.int64), (keys % n + start).astype(np.int32),
                   counts.astype(np.int32)))

  for text in tqdm(texts, total=num_docs, desc="BM25 index", unit="doc", disable=not show_progress):
    if not isinstance(text, str):
      raise ValueError(f"passage at row {row} is {type(text).__name__}, not str")
    toks = analyzer(text)
    doc_len[row] = len(toks)
    flat.extend([vocab.setdefault(t, len(vocab)) for t in toks])
    row += 1
    if row - start == chunk_docs:
      flush(row)
      flat = array.array("q")
      start = row
  if row != num_docs:
    raise ValueError(f"expected {num_docs} passages, got {row}")
  if row > start:
    flush(row)

  v = len(vocab)
  df = np.zeros(v, np.int64)
  for t, _, _ in chunks:
    df += np.bincount(t, minlength=v)
  indptr = np.zeros(v + 1, np.int64)
  np.cumsum(df, out=indptr[1:])
  rows = np.empty(indptr[-1], np.int32)
  tf = np.empty(indptr[-1], np.int32)
  fill = indptr[:-1].copy()
  for t, r, c in chunks:  # counting sort: chunks come in row order, so rows stay ascending
    u, first, cnt = np.unique(t, return_index=True, return_counts=True)
    pos = fill[t] + (np.arange(len(t)) - np.repeat(first, cnt))
    rows[pos] = r
    tf[pos] = c
    fill[u] += cnt
  return vocab, doc_len, indptr, rows, tf


def split_shards(indptr: np.ndarray, rows: np.ndarray, tf: np.ndarray, value: np.ndarray,
                 doc_len: np.ndarray, shard_docs: int | None) -> list[Shard]:
  """Cuts the postings into document ranges of `shard_docs` (default: < 2**31 postings each)."""
  n, v = len(doc_len), len(indptr) - 1
  if shard_docs is None:
    cum = np.cumsum(np.bincount(rows, minlength=n))  # postings up to and including each doc
    limit, bounds, done = 2**31 - 1, [0], 0
    while cum[-1] - done > limit:
      lo = int(np.searchsorted(cum, done + limit, side="right"))
      bounds.append(lo)
      done = int(cum[lo - 1])
    bounds.append(n)
  else:
    bounds = list(range(0, n, shard_docs)) + [n]
  tf_dtype = np.uint16 if tf.size == 0 or tf.max() < (1 << 16) else np.int32
  if len(bounds) == 2:
    return [Shard(0, n, indptr.astype(np.int32 if rows.size < 2**31 else np.int64), rows,
                  tf.astype(tf_dtype), value)]
  term = np.repeat(np.arange(v, dtype=np.int64), np.diff(indptr))
  shard_of = np.searchsorted(np.asarray(bounds[1:-1]), rows, side="right")
  order = np.argsort(shard_of, kind="stable")  # stays term-major, rows ascending within a term
  counts = np.bincount(shard_of, minlength=len(bounds) - 1)
  shards, at = [], 0
  for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    sel = order[at:at + counts[s]]
    at += counts[s]
    ptr = np.zeros(v + 1, np.int64)
    np.cumsum(np.bincount(term[sel], minlength=v), out=ptr[1:])
    shards.append(Shard(lo, hi - lo, ptr.astype(np.int32), (rows[sel] - lo).astype(np.int32),
                        tf[sel].astype(tf_dtype), value[sel]))
  return shards


# ----------------------------------------------------------------------------------------------
class SparseBM25:
  """Shared index and search; subclasses define the idf, the posting values and the queries.

  Attributes:
    ids: row -> passage id.  vocab: term -> term id.  idf [V].  doc_len [N] int32.
    tie [N] int32: id order, the tie-break.  shards: the postings.
  """

  def __init__(self, params: BM25Params, ids: Sequence[str], vocab: dict[str, int],
               idf: np.ndarray, doc_len: np.ndarray, tie: np.ndarray, shards: list[Shard],
               stats: dict, analyzer: Analyzer | None = None):
    self.params = params
    self.ids = ids
    self.vocab = vocab
    self.idf = idf
    self.doc_len = doc_len
    self.tie = tie
    self.shards = shards
    self.stats = stats
    self.analyzer = analyzer if analyzer is not None else get_analyzer(params.analyzer)

  def __len__(self) -> int:
    return len(self.ids)

  # -- per-subclass pieces -----------------------------------------------------------------------
  def _applications(self, terms: list[int]) -> list[tuple[int, int]]:
    """(term, count) pairs whose contributions are added, in summation order."""
    raise NotImplementedError

  def _contrib(self, shard: Shard, term: int, count: int, sel: np.ndarray | slice) -> np.ndarray:
    """float64 contributions of one application of (term, count) at postings `sel` of its list."""
    raise NotImplementedError

  def _finish(self, scores: np.ndarray) -> np.ndarray:
    return scores

  # -- search ------------------------------------------------------------------------------------
  def analyze(self, query: str) -> list[int]:
    """Term ids of the query's tokens that are in the vocabulary, in order, repeats kept."""
    voc = self.vocab
    return [voc[t] for t in self.analyzer(query) if t in voc]

  def _shard_scores(self, shard: Shard, apps: list[tuple[int, int]]) -> np.ndarray | None:
    """float64 scores [n_shard] of one query (None when no query term is in the shard).

    Term at a time, in summation order: np.add.at adds each posting's contribution in place,
    so every document's score is the same sequence of float64 additions as rank_bm25's loop.
    """
    scores, ptr = None, shard.indptr
    for t, c in apps:
      lo, hi = int(ptr[t]), int(ptr[t + 1])
      if hi > lo:
        if scores is None:
          scores = np.zeros(shard.num_docs)
        # intp indices: np.add.at's fast path (faster than int32 ones, worth the copy;
        # bench/bench_bm25.py).
        np.add.at(scores, shard.rows[lo:hi].astype(np.intp),
                  self._contrib(shard, t, c, slice(lo, hi)))
    return scores

  def _buffers(self, s: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Shard s's reusable (scores [n] float64, touched [n] bool), all zero between queries."""
    bufs = self.__dict__.setdefault("_bufs", {})
    if s not in bufs:
      bufs[s] = (np.zeros(n), np.zeros(n, bool))
    return bufs[s]

  def _shard_top_k(self, s: int, apps: list[tuple[int, int]], k: int):
    """(rows, scores) of one query's k best hits in shard s, or None without a hit.

    The query terms' contributions are added term at a time into a reused buffer (the float64
    additions of `_shard_scores`, in the same order); then only the hit rows are scored and
    partitioned, and the buffer is zeroed again at those rows. The hit rows are collected from
    the postings while adding when the query's postings are fewer than half the shard's
    documents, else by one scan of the buffer (cheaper when most documents are hit).
    """
    shard = self.shards[s]
    acc, seen = self._buffers(s, shard.num_docs)
    ptr = shard.indptr
    spans = [(t, c, int(ptr[t]), int(ptr[t + 1])) for t, c in apps]
    spans = [x for x in spans if x[3] > x[2]]
    if not spans:
      return None
    track = 2 * sum(hi - lo for _, _, lo, hi in spans) < shard.num_docs
    touched = []
    try:
      for t, c, lo, hi in spans:
        rows = shard.rows[lo:hi].astype(np.intp)  # intp: numpy's fast indexing paths
        if track:
          new = rows[~seen[rows]] if touched else rows
          seen[new] = True
          touched.append(new)
        np.add.at(acc, rows, self._contrib(shard, t, c, slice(lo, hi)))
      cand = (np.concatenate(touched) if len(touched) > 1 else touched[0]) if track else (
          np.flatnonzero(acc))
      scores = self._finish(acc[cand])
      if track or 8 * len(cand) < len(acc):
        acc[cand] = 0.0  # every non-zero entry is in cand
      else:
        acc.fill(0.0)
      if track:
        seen[cand] = False
    except BaseException:
      acc[:] = 0.0
      seen[:] = False
      raise
    hit = scores != 0
    if not hit.all():
      scores, cand = scores[hit], cand[hit]
    if len(scores) > k:  # the k-th best score, then only those at least as good
      kth = np.partition(scores, len(scores) - k)[len(scores) - k]
      keep = scores >= kth
      scores, cand = scores[keep], cand[keep]
    cand = cand.astype(np.int64) + shard.start
    return searcher_lib.top_k(scores, cand, self.tie[cand], k)

  def _merge(self, parts, k):
    if not parts:
      return np.zeros(0, np.int64), np.zeros(0)
    if len(parts) == 1:
      return parts[0]
    rows = np.concatenate([r for r, _ in parts])
    return searcher_lib.top_k(np.concatenate([s for _, s in parts]), rows, self.tie[rows], k)

  def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows and scores per query: (rows int64 [Q, k], scores float64 [Q, k]).

    Uses per-shard buffers of this object: one search at a time per object (processes each
    open their own; retrieval/rank_pool.py)."""
    return self._search_shards(queries, k, self._shard_top_k)

  def search_dense(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """`search` by a dense score vector per shard and a partition over all of it: the
    reference the sparse path is tested against."""
    return self._search_shards(queries, k, self._shard_top_k_dense)

  def _shard_top_k_dense(self, s, apps, k):
    shard = self.shards[s]
    scores = self._shard_scores(shard, apps)
    if scores is None:
      return None
    local, best = searcher_lib.top_k_dense(
        self._finish(scores), self.tie[shard.start:shard.start + shard.num_docs], k)
    return local + shard.start, best

  def _search_shards(self, queries, k, shard_top_k):
    """Per query: each shard's top k by `shard_top_k(shard, applications, k)`, merged."""
    if k <= 0:
      raise ValueError(f"k must be positive, got {k}")
    results = []
    for text in queries:
      apps = self._applications(self.analyze(text))
      parts = []
      for s in range(len(self.shards)) if apps else ():
        part = shard_top_k(s, apps, k)
        if part is not None and len(part[0]):
          parts.append(part)
      results.append(self._merge(parts, k))
    return searcher_lib.pad_results(results, k)

  def score_all(self, queries: Sequence[str]) -> np.ndarray:
    """Dense scores [Q, N] (small corpora and tests)."""
    out = np.zeros((len(queries), len(self.ids)))
    for i, text in enumerate(queries):
      apps = self._applications(self.analyze(text))
      for shard in self.shards if apps else ():
        scores = self._shard_scores(shard, apps)
        if scores is not None:
          out[i, shard.start:shard.start + shard.num_docs] = scores
    return self._finish(out)

  def save(self, path: str | os.PathLike) -> None:
    from retrieval import index_io
    index_io.save_index(self, path)


class ExactOkapiBM25(SparseBM25):
  """rank_bm25.BM25Okapi's scores, exactly: every document's score is the same float64
  sequence of additions of idf(t) * tfn(t, d) over the query's tokens in order (repeats count)."""

  @classmethod
  def build(cls, texts: Sequence[str], ids: Sequence[str], params: BM25Params | None = None,
            analyzer: Analyzer | None = None, show_progress: bool = True,
            shard_docs: int | None = None) -> "ExactOkapiBM25":
    p = params or okapi_params()
    _check_corpus(texts, ids)
    an = analyzer if analyzer is not None else get_analyzer(p.analyzer)
    vocab, doc_len, indptr, rows, tf = invert(texts, len(texts), an, show_progress)
    df = np.diff(indptr)
    idf, stats = cls.idf_and_stats(p, df, doc_len)
    term = np.repeat(np.arange(len(vocab)), df)
    value = cls.values(p, stats, idf[term], tf, doc_len[rows])
    stats["num_postings"] = int(rows.size)
    return cls(p, list(ids), vocab, idf, doc_len.astype(np.int32),
               searcher_lib.id_order(ids), split_shards(indptr, rows, tf, value, doc_len,
                                                         shard_docs), stats, an)

  @staticmethod
  def idf_and_stats(p: BM25Params, df: np.ndarray, doc_len: np.ndarray) -> tuple[np.ndarray, dict]:
    """(idf [V] float64, stats) from document frequencies in term-id order (rank_bm25's
    first-occurrence order: the order its mean idf is summed in) and every passage's length."""
    n = len(doc_len)
    avgdl = int(doc_len.sum()) / n
    idf = np.empty(len(df))
    idf_sum, negative = 0.0, []
    for t, f in enumerate(df.tolist()):  # math.log and this summation order, as rank_bm25
      idf[t] = math.log(n - f + 0.5) - math.log(f + 0.5)
      idf_sum += idf[t]
      if idf[t] < 0:
        negative.append(t)
    mean_idf = idf_sum / len(df) if len(df) else 0.0
    idf[negative] = p.epsilon * mean_idf
    return idf, {"num_docs": n, "avgdl": avgdl, "mean_idf": mean_idf}

  @staticmethod
  def values(p: BM25Params, stats: dict, idf_p: np.ndarray, tf_p: np.ndarray,
             doc_len_p: np.ndarray) -> np.ndarray:
    """float64 value of each posting, from its term's idf, its tf and its passage's length:
    rank_bm25's operations, element by element (the same bits whichever postings are given)."""
    denom = p.k1 * (1 - p.b + p.b * doc_len_p / stats["avgdl"])
    tf64 = tf_p.astype(np.int64)
    return idf_p * (tf64 * (p.k1 + 1) / (tf64 + denom))

  def _applications(self, terms):
    return [(t, 1) for t in terms]  # every token, repeats included, in query order

  def _contrib(self, shard, term, count, sel):
    return shard.value[sel]  # idf(t) * tfn(t, d), computed once at indexing


class LuceneBM25(SparseBM25):
  """Lucene's BM25Similarity (8.0+), the scorer behind pyserini's LuceneSearcher.

  Per term t of a query (repeated c times: pyserini's bag-of-words boosts the clause by c):
  w = c * idf(t), score = w - w / (1 + tf * normInverse(d)), all in float32, with
  normInverse = 1 / (k1 * ((1 - b) + b * L(d) / avgdl)) and L(d) the length decoded from its byte.
  Term scores are summed in float64 and the total rounded to float32, as Lucene's BooleanScorer.
  N and avgdl count only documents with at least one token (Lucene's docCount).
  """

  @classmethod
  def build(cls, texts: Sequence[str], ids: Sequence[str], params: BM25Params | None = None,
            analyzer: Analyzer | None = None, show_progress: bool = True,
            shard_docs: int | None = None) -> "LuceneBM25":
    p = params or BM25Params()
    _check_corpus(texts, ids)
    an = analyzer if analyzer is not None else get_analyzer(p.analyzer)
    vocab, doc_len, indptr, rows, tf = invert(texts, len(texts), an, show_progress)
    df = np.diff(indptr)
    idf, stats = cls.idf_and_stats(p, df, doc_len)
    norms = encode_lengths(doc_len)
    term = np.repeat(np.arange(len(vocab)), df)
    value = cls.values(p, stats, idf[term], tf, norms[rows])  # float32
    stats["num_postings"] = int(rows.size)
    obj = cls(p, list(ids), vocab, idf, doc_len.astype(np.int32), searcher_lib.id_order(ids),
              split_shards(indptr, rows, tf, value, doc_len, shard_docs), stats, an)
    obj.norms = norms
    return obj

  @staticmethod
  def idf_and_stats(p: BM25Params, df: np.ndarray, doc_len: np.ndarray) -> tuple[np.ndarray, dict]:
    """(idf [V] float32, stats) from document frequencies and every passage's length."""
    doc_count = int(np.count_nonzero(doc_len))
    avgdl = np.float32(int(doc_len.sum()) / doc_count) if doc_count else np.float32(1)
    idf = np.array([math.log(1 + (doc_count - f + 0.5) / (f + 0.5)) for f in df.tolist()],
                   np.float32)
    return idf, {"num_docs": len(doc_len), "doc_count": doc_count, "avgdl": float(avgdl)}

  @classmethod
  def values(cls, p: BM25Params, stats: dict, idf_p: np.ndarray, tf_p: np.ndarray,
             norm_p: np.ndarray) -> np.ndarray:
    """float32 score of one query occurrence per posting, from its term's idf, its tf and its
    passage's norm byte (element by element: the same bits whichever postings are given)."""
    return cls._term_score(idf_p, tf_p, cls._norm_inverse(p, np.float32(stats["avgdl"]))[norm_p])

  @staticmethod
  def _norm_inverse(p: BM25Params, avgdl: np.float32) -> np.ndarray:
    """cache[256] float32: 1 / (k1 * ((1 - b) + b * L / avgdl)) per norm byte."""
    k1, b, one = np.float32(p.k1), np.float32(p.b), np.float32(1)
    return (one / (k1 * ((one - b) + b * LENGTH_TABLE / np.float32(avgdl)))).astype(np.float32)

  @staticmethod
  def _term_score(w: np.ndarray, tf: np.ndarray, norm_inv: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float32)
    return w - w / (np.float32(1) + tf.astype(np.float32) * norm_inv)

  @property
  def norm_inverse(self) -> np.ndarray:
    c = getattr(self, "_cache", None)
    if c is None:
      c = self._cache = self._norm_inverse(self.params, np.float32(self.stats["avgdl"]))
    return c

  def _applications(self, terms):
    counts: dict[int, int] = {}
    for t in terms:
      counts[t] = counts.get(t, 0) + 1
    return list(counts.items())

  def _contrib(self, shard, term, count, sel):
    if count == 1:
      return shard.value[sel].astype(np.float64)  # float32 values (np.add.at wants one dtype)
    rows = shard.rows[sel] + shard.start
    w = np.float32(count) * self.idf[term]
    return self._term_score(w, shard.tf[sel], self.norm_inverse[self.norms[rows]]).astype(
        np.float64)

  def _finish(self, scores):
    return scores.astype(np.float32).astype(np.float64)


class RankBM25Searcher:
  """rank_bm25.BM25Okapi behind the Searcher interface: the reference (Python loop per document
  and query term; small corpora only). Same hits (non-zero scores) and tie-break as the others."""

  def __init__(self, texts: Sequence[str], ids: Sequence[str], params: BM25Params | None = None,
               analyzer: Analyzer | None = None):
    from rank_bm25 import BM25Okapi
    p = params or okapi_params()
    _check_corpus(texts, ids)
    self.params = p
    self.ids = list(ids)
    self.analyzer = analyzer if analyzer is not None else get_analyzer(p.analyzer)
    self.bm25 = BM25Okapi([self.analyzer(t) for t in texts], k1=p.k1, b=p.b, epsilon=p.epsilon)
    self.tie = searcher_lib.id_order(ids)

  def score_all(self, queries: Sequence[str]) -> np.ndarray:
    return np.stack([self.bm25.get_scores(self.analyzer(q)) for q in queries])

  def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    results = []
    for q in queries:
      s = self.bm25.get_scores(self.analyzer(q))
      rows = np.flatnonzero(s)
      results.append(searcher_lib.top_k(s[rows], rows, self.tie[rows], k))
    return searcher_lib.pad_results(results, k)


def build_bm25(collection_or_texts, ids: Sequence[str] | None = None, kind: str = "lucene",
               k1: float | None = None, b: float | None = None, epsilon: float = 0.25,
               analyzer: str | None = None, show_progress: bool = True,
               shard_docs: int | None = None) -> SparseBM25:
  """Builds a BM25 index over passages.

  Args:
    collection_or_texts: a Collection (cqr_jax.data.types: `ids()` and iteration of Passages,
      indexed as `contents` = title + text) or a sequence of texts.
    ids: passage ids, one per text (taken from the collection when one is given).
    kind: "lucene" (pyserini-style; default k1/b 0.9/0.4) or "okapi" (rank_bm25-exact;
      default k1/b 1.5/0.75).
    analyzer: analyzer name (default: "lucene_english" for lucene, "whitespace_lower" for okapi).
    shard_docs: documents per shard (default: as few shards as int32 indices allow).
  """
  p = params_for(kind, k1, b, epsilon, analyzer)
  if ids is None:
    if not hasattr(collection_or_texts, "ids"):
      raise ValueError("ids are required when passing texts")
    ids = list(collection_or_texts.ids())
    texts = [p.contents for p in collection_or_texts]
  else:
    texts = collection_or_texts
  cls = ExactOkapiBM25 if kind == "okapi" else LuceneBM25
  return cls.build(texts, ids, p, show_progress=show_progress, shard_docs=shard_docs)


def params_for(kind: str = "lucene", k1: float | None = None, b: float | None = None,
               epsilon: float = 0.25, analyzer: str | None = None) -> BM25Params:
  """The parameters `build_bm25` uses: okapi defaults to k1/b 1.5/0.75 and "whitespace_lower",
  lucene to 0.9/0.4 and "lucene_english"."""
  if kind == "okapi":
    return okapi_params(1.5 if k1 is None else k1, 0.75 if b is None else b, epsilon,
                        analyzer or "whitespace_lower")
  if kind == "lucene":
    return BM25Params("lucene", TOPIOCQA_K1_B[0] if k1 is None else k1,
                      TOPIOCQA_K1_B[1] if b is None else b, epsilon, analyzer or "lucene_english")
  raise ValueError(f"kind must be 'lucene' or 'okapi', got {kind!r}")
