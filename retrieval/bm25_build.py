"""A BM25 index built from passages streamed once, with bounded postings memory (issue 33).

`StreamBuilder` takes passages in row order and writes the `index_io` layout that
`ExactOkapiBM25.build` / `LuceneBM25.build` would produce for the same passages, array for array:
the same vocabulary order (first occurrence), idf, posting values, tie order and stats.

Memory: term ids of the passages not yet flushed are buffered; when `max_postings` tokens are
buffered the buffer is sorted into a run file (term, row, tf) on disk. At the end each shard's
runs are merged, a block of at most `max_postings` postings at a time (read, not mapped), into
the final arrays, written sequentially: about 30 bytes per `max_postings` at peak. Besides that,
memory grows only with the vocabulary (a dict of the terms) and by a few tens of bytes per
passage (length, id offset, the id sort for the tie order).
Shards are document ranges of at most `shard_postings` tokens (int32 posting offsets).
"""

from __future__ import annotations

import array
import collections
import contextlib
import hashlib
import json
import os
import shutil

import numpy as np

from retrieval import bm25 as bm25_lib
from retrieval import index_io
from retrieval.analyzer import get_analyzer

INT32_POSTINGS = 2**31 - 1


class Fingerprint:
  """The corpus fingerprint: passages counted and a BLAKE2b hash of their ids and contents, in
  row order (each length-prefixed, so no two corpora hash the same by concatenation)."""

  def __init__(self):
    self.count = 0
    self._h = hashlib.blake2b(digest_size=16)

  def add(self, pid: str, text: str) -> None:
    a, b = pid.encode("utf-8"), text.encode("utf-8")
    self._h.update(len(a).to_bytes(8, "little") + a + len(b).to_bytes(8, "little") + b)
    self.count += 1

  def value(self) -> dict:
    return {"num_docs": self.count, "blake2b": self._h.hexdigest()}


class StreamBuilder:
  """Builds one index directory from (id, contents) pairs added in row order.

  Args:
    out_dir: the index directory (created; its files are replaced).
    params: BM25Params (kind, k1, b, epsilon, analyzer name).
    work_dir: where run files go (deleted as shards are merged).
    max_postings: tokens buffered before a run is written, and postings per merge block.
    shard_postings: most tokens per shard (default: int32 posting offsets' limit).
  """

  def __init__(self, out_dir: str, params: bm25_lib.BM25Params, work_dir: str,
               max_postings: int = 20_000_000, shard_postings: int = INT32_POSTINGS):
    if max_postings <= 0 or not 0 < shard_postings <= INT32_POSTINGS:
      raise ValueError(f"max_postings must be positive and shard_postings in [1, 2**31 - 1], "
                       f"got {max_postings}, {shard_postings}")
    self.out, self.params, self.work = out_dir, params, work_dir
    self.max_postings, self.shard_postings = max_postings, shard_postings
    self.analyzer = get_analyzer(params.analyzer)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(work_dir, exist_ok=True)
    self.vocab: dict[str, int] = collections.defaultdict()
    self.vocab.default_factory = self.vocab.__len__  # a new term gets the next id
    self.doc_len = array.array("q")
    self.id_offsets = array.array("q", [0])
    self.max_id_bytes = 0
    self._ids = open(os.path.join(out_dir, "ids.txt"), "wb")
    self.fingerprint = Fingerprint()
    self._flat = array.array("i")  # term ids of the buffered passages' tokens
    self._buf_start = 0  # first row in the buffer
    self.shards: list[dict] = [{"start": 0, "tokens": 0, "runs": [], "df": None}]
    self.max_tf = 0
    self._run_count = 0

  @property
  def buffered(self) -> int:
    return len(self._flat)

  def add(self, pid: str, text: str) -> None:
    row = len(self.doc_len)
    if not isinstance(pid, str):
      raise ValueError(f"passage id at row {row} is {type(pid).__name__}, not str: {pid!r}")
    if not isinstance(text, str):
      raise ValueError(f"passage at row {row} is {type(text).__name__}, not str")
    if "\n" in pid:
      raise ValueError(f"passage id {row} contains a newline and cannot be saved: {pid!r}")
    self.fingerprint.add(pid, text)
    b = pid.encode("utf-8")
    self._ids.write(b + b"\n")
    self.id_offsets.append(self.id_offsets[-1] + len(b) + 1)
    self.max_id_bytes = max(self.max_id_bytes, len(b))
    voc = self.vocab
    toks = [voc[t] for t in self.analyzer(text)]
    shard = self.shards[-1]
    if shard["tokens"] and shard["tokens"] + len(toks) > self.shard_postings:
      self.flush()
      self.shards.append({"start": row, "tokens": 0, "runs": [], "df": None})
      shard = self.shards[-1]
    shard["tokens"] += len(toks)
    self.doc_len.append(len(toks))
    self._flat.extend(toks)
    if len(self._flat) >= self.max_postings:
      self.flush()

  def flush(self) -> None:
    """Sorts the buffered passages' postings by (term, row) into a run file of the last shard."""
    start, end = self._buf_start, len(self.doc_len)
    if end == start:
      return
    n = end - start
    # (term, row) keys sorted in place, then counted: about 30 bytes per buffered token at peak.
    keys = np.frombuffer(self._flat, np.int32).astype(np.int64) if len(self._flat) else (
        np.zeros(0, np.int64))
    self._flat = array.array("i")
    keys *= n
    keys += np.repeat(np.arange(n, dtype=np.int64),
                      np.frombuffer(self.doc_len, np.int64)[start:end])
    keys.sort()
    first = np.empty(len(keys), bool)
    first[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    at = np.flatnonzero(first)
    del first
    counts = np.diff(np.append(at, len(keys)))
    keys = keys[at]
    del at
    term = (keys // n).astype(np.int32)
    keys %= n
    keys += start
    row = keys.astype(np.int32)
    del keys
    shard = self.shards[-1]
    df = np.bincount(term, minlength=len(self.vocab))
    shard["df"] = df if shard["df"] is None else _add_grow(shard["df"], df)
    if counts.size:
      self.max_tf = max(self.max_tf, int(counts.max()))
    base = os.path.join(self.work, f"run-{self._run_count:05d}")
    self._run_count += 1
    for name, a in (("term", term), ("row", row), ("tf", counts.astype(np.int32))):
      np.save(f"{base}-{name}.npy", a)
    shard["runs"].append(base)
    self._buf_start = end

  def finish(self) -> dict:
    """Writes the index; returns {"num_docs", "num_postings", "num_shards", "fingerprint"}."""
    self.flush()
    self._ids.close()
    n = len(self.doc_len)
    if n == 0:
      raise ValueError("cannot build a BM25 index over an empty corpus (0 passages)")
    p, v = self.params, len(self.vocab)
    doc_len = np.frombuffer(self.doc_len, np.int64)
    df = np.zeros(v, np.int64)
    for sh in self.shards:
      sh["df"] = _add_grow(np.zeros(v, np.int64), sh["df"]) if sh["df"] is not None else (
          np.zeros(v, np.int64))
      df += sh["df"]
    cls = bm25_lib.LuceneBM25 if p.kind == "lucene" else bm25_lib.ExactOkapiBM25
    idf, stats = cls.idf_and_stats(p, df, doc_len)
    stats["num_postings"] = int(df.sum())
    per_doc = bm25_lib.encode_lengths(doc_len) if p.kind == "lucene" else doc_len
    tf_dtype = np.uint16 if self.max_tf < (1 << 16) else np.int32
    np.save(os.path.join(self.out, "ids_offsets.npy"), np.frombuffer(self.id_offsets, np.int64))
    np.save(os.path.join(self.out, "tie.npy"), self._tie(n))
    np.save(os.path.join(self.out, "idf.npy"), idf)
    np.save(os.path.join(self.out, "doc_len.npy"), doc_len.astype(np.int32))
    if p.kind == "lucene":
      np.save(os.path.join(self.out, "norms.npy"), per_doc)
    with open(os.path.join(self.out, "vocab.txt"), "w", encoding="utf-8", newline="\n") as f:
      for i, term in enumerate(self.vocab):  # insertion order = term id order
        if "\n" in term:
          raise ValueError(f"term {i} contains a newline and cannot be saved: {term!r}")
        f.write(term + "\n")
    ends = [sh["start"] for sh in self.shards[1:]] + [n]
    shards_meta = []
    for s, (sh, end) in enumerate(zip(self.shards, ends)):
      self._merge_shard(s, sh, end, cls, stats, idf, per_doc, tf_dtype)
      shards_meta.append({"start": sh["start"], "num_docs": end - sh["start"],
                          "num_postings": int(sh["df"].sum())})
    meta = {"format": index_io.FORMAT, "version": index_io.VERSION, "kind": p.kind,
            "params": {f: getattr(p, f) for f in ("k1", "b", "epsilon", "analyzer")},
            "num_docs": n, "num_terms": v, "stats": stats, "shards": shards_meta}
    with open(os.path.join(self.out, "meta.json"), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
    return {"num_docs": n, "num_postings": stats["num_postings"],
            "num_shards": len(self.shards), "fingerprint": self.fingerprint.value()}

  def _tie(self, n: int) -> np.ndarray:
    """Each row's rank in sorted id order (searcher.id_order: UTF-8 byte order is code point
    order); a duplicate id is refused naming both rows."""
    offsets = np.frombuffer(self.id_offsets, np.int64)
    keys = np.zeros(n, f"S{max(self.max_id_bytes, 1)}")
    with open(os.path.join(self.out, "ids.txt"), "rb") as f:
      for lo in range(0, n, 1 << 20):
        hi = min(n, lo + (1 << 20))
        f.seek(int(offsets[lo]))
        blob = f.read(int(offsets[hi] - offsets[lo]))
        keys[lo:hi] = blob.split(b"\n")[:hi - lo]
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if len(same):
      a, b = sorted(int(x) for x in order[same[0]:same[0] + 2])
      raise ValueError(f"duplicate passage id {keys[a].decode('utf-8')!r} at rows {a} and {b}")
    tie = np.empty(n, np.int32)
    tie[order] = np.arange(n, dtype=np.int32)
    return tie

  def _merge_shard(self, s, sh, end, cls, stats, idf, per_doc, tf_dtype) -> None:
    """Shard s's runs -> shard-SSSSS/{indptr,rows,tf,value}.npy, one term block at a time."""
    d = os.path.join(self.out, f"shard-{s:05d}")
    os.makedirs(d, exist_ok=True)
    df = sh["df"]
    total = int(df.sum())
    indptr = np.zeros(len(df) + 1, np.int64)
    np.cumsum(df, out=indptr[1:])
    np.save(os.path.join(d, "indptr.npy"), indptr.astype(np.int32 if total < 2**31 else np.int64))
    runs = [_Run(r) for r in sh["runs"]]
    bounds = [0]  # term blocks of at most max_postings postings (at least one term each)
    while bounds[-1] < len(df):
      t0 = bounds[-1]
      t1 = int(np.searchsorted(indptr, indptr[t0] + self.max_postings, side="right")) - 1
      bounds.append(min(max(t1, t0 + 1), len(df)))

    def block_arrays():
      for t0, t1 in zip(bounds[:-1], bounds[1:]):
        parts = [x for x in (run.read(t0, t1) for run in runs) if x is not None]
        if not parts:
          continue
        term, row, tf = (np.concatenate(x) for x in zip(*parts))
        del parts
        order = np.argsort(term, kind="stable")  # runs are in row order: rows stay ascending
        term, row, tf = term[order], row[order], tf[order]
        del order
        for lo in range(0, len(term), 1 << 20):  # values' temporaries: 1M postings at a time
          sl = slice(lo, lo + (1 << 20))
          yield (row[sl] - sh["start"], tf[sl],
                 cls.values(self.params, stats, idf[term[sl]], tf[sl], per_doc[row[sl]]))

    # Three files written in step: each block's arrays go to all three.
    names = ("rows", "tf", "value")
    dtypes = (np.int32, tf_dtype, np.float32 if self.params.kind == "lucene" else np.float64)
    with contextlib.ExitStack() as stack:
      files = [stack.enter_context(open(os.path.join(d, f"{n}.npy"), "wb")) for n in names]
      for run in runs:
        stack.callback(run.close)
      for f, dt in zip(files, dtypes):
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(
            np.dtype(dt)), "fortran_order": False, "shape": (total,)})
      done = 0
      for arrays in block_arrays():
        for f, a, dt in zip(files, arrays, dtypes):
          f.write(np.ascontiguousarray(a, dtype=dt).tobytes())
        done += len(arrays[0])
    if done != total:
      raise RuntimeError(f"{d}: merged {done} postings, expected {total}")
    for r in sh["runs"]:
      for n in ("term", "row", "tf"):
        os.remove(f"{r}-{n}.npy")

  def abort(self) -> None:
    """Closes files and removes the run files (after an error)."""
    if not self._ids.closed:
      self._ids.close()
    shutil.rmtree(self.work, ignore_errors=True)


class _Run:
  """A run file's postings of a term range, read from disk (the term array is memory-mapped
  for the binary search only, so the merge's resident memory is its block)."""

  def __init__(self, base: str):
    self.term = np.load(f"{base}-term.npy", mmap_mode="r")
    self.files = {}
    for n in ("term", "row", "tf"):
      offset = np.load(f"{base}-{n}.npy", mmap_mode="r").offset  # the .npy header's length
      self.files[n] = (open(f"{base}-{n}.npy", "rb"), offset)

  def read(self, t0: int, t1: int):
    """[term, row, tf] of the postings of terms [t0, t1), or None."""
    lo, hi = (int(x) for x in np.searchsorted(self.term, [t0, t1]))
    if hi == lo:
      return None
    out = []
    for n in ("term", "row", "tf"):
      f, at = self.files[n]
      f.seek(at + 4 * lo)
      out.append(np.fromfile(f, np.int32, hi - lo))
    return out

  def close(self) -> None:
    for f, _ in self.files.values():
      f.close()
    self.term = None


def _add_grow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """a + b for 1-D counts of possibly different lengths (the vocabulary grows)."""
  if len(b) > len(a):
    a = np.concatenate([a, np.zeros(len(b) - len(a), a.dtype)])
  a[:len(b)] += b
  return a
