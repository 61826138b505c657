"""BM25 over an inverted index held as term-major posting arrays (method.md 4.2, 5.2).

Two scorers share one index layout (docs/retrieval.md):
- `ExactOkapiBM25`: rank_bm25.BM25Okapi's scores bit for bit (same idf with its floor of
  epsilon * mean idf for negative idf, same float64 operations in the same order).
- `LuceneBM25`: Lucene 8+/pyserini BM25: idf log(1 + (N - n + 0.5) / (n + 0.5)), document
  length stored lossily in one byte (SmallFloat), float32 term scores summed in float64.
`RankBM25Searcher` wraps rank_bm25 itself: the reference, and a backend for small corpora.

Search, per query and shard: each query term's posting list is added into a dense score vector
with np.add.at (term at a time, in query order), then a top-k by np.partition (numpy only).
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
        # intp indices: np.add.at's fast path (~1.5x faster than int32 ones, worth the copy).
        np.add.at(scores, shard.rows[lo:hi].astype(np.intp),
                  self._contrib(shard, t, c, slice(lo, hi)))
    return scores

  def _merge(self, parts, k):
    if not parts:
      return np.zeros(0, np.int64), np.zeros(0)
    if len(parts) == 1:
      return parts[0]
    rows = np.concatenate([r for r, _ in parts])
    return searcher_lib.top_k(np.concatenate([s for _, s in parts]), rows, self.tie[rows], k)

  def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows and scores per query: (rows int64 [Q, k], scores float64 [Q, k])."""
    if k <= 0:
      raise ValueError(f"k must be positive, got {k}")
    results = []
    for text in queries:
      apps = self._applications(self.analyze(text))
      parts = []
      for shard in self.shards if apps else ():
        scores = self._shard_scores(shard, apps)
        if scores is None:
          continue
        local, best = searcher_lib.top_k_dense(
            self._finish(scores), self.tie[shard.start:shard.start + shard.num_docs], k)
        parts.append((local + shard.start, best))
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
    n = len(texts)
    avgdl = int(doc_len.sum()) / n
    df = np.diff(indptr)
    idf = np.empty(len(vocab))
    idf_sum, negative = 0.0, []
    for t, f in enumerate(df.tolist()):  # math.log and this summation order, as rank_bm25
      idf[t] = math.log(n - f + 0.5) - math.log(f + 0.5)
      idf_sum += idf[t]
      if idf[t] < 0:
        negative.append(t)
    mean_idf = idf_sum / len(vocab) if len(vocab) else 0.0
    idf[negative] = p.epsilon * mean_idf
    denom_d = p.k1 * (1 - p.b + p.b * doc_len / avgdl)  # [N], same operations as rank_bm25
    tf64 = tf.astype(np.int64)
    term = np.repeat(np.arange(len(vocab)), df)
    value = idf[term] * (tf64 * (p.k1 + 1) / (tf64 + denom_d[rows]))  # rank_bm25's product
    stats = {"num_docs": n, "avgdl": avgdl, "mean_idf": mean_idf, "num_postings": int(rows.size)}
    return cls(p, list(ids), vocab, idf, doc_len.astype(np.int32),
               searcher_lib.id_order(ids), split_shards(indptr, rows, tf, value, doc_len,
                                                         shard_docs), stats, an)

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
    doc_count = int(np.count_nonzero(doc_len))
    avgdl = np.float32(int(doc_len.sum()) / doc_count) if doc_count else np.float32(1)
    df = np.diff(indptr)
    idf = np.array([math.log(1 + (doc_count - f + 0.5) / (f + 0.5)) for f in df.tolist()],
                   np.float32)
    norms = encode_lengths(doc_len)
    norm_inv = cls._norm_inverse(p, avgdl)
    term = np.repeat(np.arange(len(vocab)), df)
    value = cls._term_score(idf[term], tf, norm_inv[norms[rows]])  # float32
    stats = {"num_docs": len(texts), "doc_count": doc_count, "avgdl": float(avgdl),
             "num_postings": int(rows.size)}
    obj = cls(p, list(ids), vocab, idf, doc_len.astype(np.int32), searcher_lib.id_order(ids),
              split_shards(indptr, rows, tf, value, doc_len, shard_docs), stats, an)
    obj.norms = norms
    return obj

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
  if ids is None:
    if not hasattr(collection_or_texts, "ids"):
      raise ValueError("ids are required when passing texts")
    ids = list(collection_or_texts.ids())
    texts = [p.contents for p in collection_or_texts]
  else:
    texts = collection_or_texts
  if kind == "okapi":
    p = okapi_params(1.5 if k1 is None else k1, 0.75 if b is None else b, epsilon,
                     analyzer or "whitespace_lower")
    return ExactOkapiBM25.build(texts, ids, p, show_progress=show_progress, shard_docs=shard_docs)
  if kind == "lucene":
    p = BM25Params("lucene", TOPIOCQA_K1_B[0] if k1 is None else k1,
                   TOPIOCQA_K1_B[1] if b is None else b, epsilon, analyzer or "lucene_english")
    return LuceneBM25.build(texts, ids, p, show_progress=show_progress, shard_docs=shard_docs)
  raise ValueError(f"kind must be 'lucene' or 'okapi', got {kind!r}")
