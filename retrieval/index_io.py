"""BM25 index on disk: plain .npy arrays, text lists and a JSON header (no pickle).

Layout of an index directory (docs/retrieval.md):
  meta.json        {"format": "cqr-jax-bm25", "version": 1, "kind", "params", "stats", "shards"}
  ids.txt          passage id of row r on line r (UTF-8, "\\n"-terminated)
  ids_offsets.npy  [N + 1] int64 byte offset of each line of ids.txt, then its size (optional:
                   computed when missing)
  vocab.txt        term of term id t on line t
  idf.npy          [V] float64 (okapi) / float32 (lucene)
  doc_len.npy      [N] int32 tokens per passage
  tie.npy          [N] int32 rank of each row's id in sorted id order (tie-break)
  norms.npy        [N] uint8 Lucene length bytes (lucene only)
  shard-SSSSS/     indptr.npy [V + 1] int32|int64, rows.npy [P] int32 (row - shard start),
                   tf.npy [P] uint16|int32,
                   value.npy [P] float64 (okapi) | float32 (lucene) (see bm25.Shard)
Arrays of postings and per-passage arrays are opened memory-mapped (np.load(mmap_mode="r"), as
plain ndarray views of the maps) unless mmap=False; `lazy_ids` reads passage ids from a memory
map of ids.txt on demand.
"""

from __future__ import annotations

import json
import mmap as mmap_lib
import os
from typing import Iterator, Sequence

import numpy as np

from retrieval import bm25 as bm25_lib

FORMAT, VERSION = "cqr-jax-bm25", 2  # 2: the tokenizer of retrieval/analyzer.py since session 23


def _write_lines(path: str, items: Sequence[str], what: str) -> None:
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for i, s in enumerate(items):
      if "\n" in s:
        raise ValueError(f"{what} {i} contains a newline and cannot be saved: {s!r}")
      f.write(s)
      f.write("\n")


def _read_lines(path: str, expected: int) -> list[str]:
  with open(path, encoding="utf-8", newline="") as f:
    text = f.read()
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  if len(lines) != expected:
    raise ValueError(f"{path}: expected {expected} lines (meta.json), found {len(lines)}")
  return lines


def line_offsets(path: str, chunk: int = 1 << 26) -> np.ndarray:
  """[n + 1] int64: the byte offset of each "\\n"-terminated line of a file, then its size."""
  out = [np.zeros(1, np.int64)]
  with open(path, "rb") as f:
    at = 0
    while True:
      block = f.read(chunk)
      if not block:
        break
      out.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 10).astype(np.int64) + at + 1)
      at += len(block)
  offsets = np.concatenate(out)
  if offsets[-1] != at:
    raise ValueError(f"{path}: the last line has no newline (truncated?)")
  return offsets


def _load(path: str, mode: str | None) -> np.ndarray:
  """np.load; a memory map comes back as a plain ndarray view of it (numpy's memmap subclass
  costs microseconds per slice in the search loop)."""
  a = np.load(path, mmap_mode=mode)
  return a.view(np.ndarray) if isinstance(a, np.memmap) else a


class MappedLines(Sequence[str]):
  """Line i (without its newline) of a UTF-8 file, decoded from a memory map on demand."""

  def __init__(self, path: str, offsets: np.ndarray):
    self.path = path
    self._offsets = offsets
    self._n = len(offsets) - 1
    with open(path, "rb") as f:
      empty = os.fstat(f.fileno()).st_size == 0
      self._map = b"" if empty else mmap_lib.mmap(f.fileno(), 0, access=mmap_lib.ACCESS_READ)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):  # type: ignore[override]
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(self._n))]
    if i < 0:
      i += self._n
    if not 0 <= i < self._n:
      raise IndexError(f"line {i} out of range ({self._n} lines)")
    o = self._offsets
    return self._map[o[i]:o[i + 1] - 1].decode("utf-8")

  def take(self, rows) -> list[str]:
    """The lines of `rows` (non-negative ints), in order: one gather of their offsets."""
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= self._n):
      raise IndexError(f"a row out of range ({self._n} lines)")
    m = self._map
    return [m[a:b - 1].decode("utf-8") for a, b in zip(self._offsets[rows].tolist(),
                                                       self._offsets[rows + 1].tolist())]

  def __iter__(self) -> Iterator[str]:
    return (self[i] for i in range(len(self)))

  def __eq__(self, other) -> bool:
    return isinstance(other, Sequence) and len(other) == len(self) and all(
        a == b for a, b in zip(self, other))


def save_index(index: bm25_lib.SparseBM25, path: str | os.PathLike) -> None:
  """Writes `index` to directory `path` (created if needed; existing files overwritten)."""
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  vocab = [""] * len(index.vocab)
  for term, t in index.vocab.items():
    vocab[t] = term
  _write_lines(os.path.join(path, "ids.txt"), index.ids, "passage id")
  np.save(os.path.join(path, "ids_offsets.npy"), line_offsets(os.path.join(path, "ids.txt")))
  _write_lines(os.path.join(path, "vocab.txt"), vocab, "term")
  np.save(os.path.join(path, "idf.npy"), index.idf)
  np.save(os.path.join(path, "doc_len.npy"), index.doc_len)
  np.save(os.path.join(path, "tie.npy"), index.tie)
  if isinstance(index, bm25_lib.LuceneBM25):
    np.save(os.path.join(path, "norms.npy"), index.norms)
  shards = []
  for s, shard in enumerate(index.shards):
    d = os.path.join(path, f"shard-{s:05d}")
    os.makedirs(d, exist_ok=True)
    for name in ("indptr", "rows", "tf", "value"):
      np.save(os.path.join(d, f"{name}.npy"), np.asarray(getattr(shard, name)))
    shards.append({"start": shard.start, "num_docs": shard.num_docs,
                   "num_postings": int(shard.rows.size)})
  meta = {"format": FORMAT, "version": VERSION, "kind": index.params.kind,
          "params": {f: getattr(index.params, f) for f in ("k1", "b", "epsilon", "analyzer")},
          "num_docs": len(index.ids), "num_terms": len(vocab), "stats": index.stats,
          "shards": shards}
  with open(os.path.join(path, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)


def load_ids(path: str, num_docs: int) -> MappedLines:
  """The passage ids of an index directory, read on demand from ids.txt."""
  ids_path, off_path = os.path.join(path, "ids.txt"), os.path.join(path, "ids_offsets.npy")
  size = os.path.getsize(ids_path)
  offsets = _load(off_path, "r") if os.path.exists(off_path) else None
  if offsets is None or len(offsets) != num_docs + 1 or int(offsets[-1]) != size:
    offsets = line_offsets(ids_path)
  if len(offsets) != num_docs + 1:
    raise ValueError(f"{ids_path}: expected {num_docs} lines (meta.json), found "
                     f"{len(offsets) - 1}")
  return MappedLines(ids_path, offsets)


def load_index(path: str | os.PathLike, mmap: bool = True, analyzer=None,
               lazy_ids: bool = False) -> bm25_lib.SparseBM25:
  """Opens an index written by `save_index`; `analyzer` overrides the one named in meta.json
  (required when the index was built with a custom callable); `lazy_ids`: ids as a
  `MappedLines` (no Python string per passage held)."""
  path = os.fspath(path)
  meta_path = os.path.join(path, "meta.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{meta_path}: no BM25 index here (meta.json missing)")
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise ValueError(f"{meta_path}: not a {FORMAT} v{VERSION} index "
                     f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
  mode = "r" if mmap else None
  params = bm25_lib.BM25Params(kind=meta["kind"], **meta["params"])
  ids = (load_ids(path, meta["num_docs"]) if lazy_ids
         else _read_lines(os.path.join(path, "ids.txt"), meta["num_docs"]))
  vocab = {t: i for i, t in enumerate(_read_lines(os.path.join(path, "vocab.txt"),
                                                  meta["num_terms"]))}
  shards = []
  for s, info in enumerate(meta["shards"]):
    d = os.path.join(path, f"shard-{s:05d}")
    arrs = {n: _load(os.path.join(d, f"{n}.npy"), mode)
            for n in ("indptr", "rows", "tf", "value")}
    shards.append(bm25_lib.Shard(info["start"], info["num_docs"], **arrs))
  cls = bm25_lib.LuceneBM25 if params.kind == "lucene" else bm25_lib.ExactOkapiBM25
  index = cls(params, ids, vocab, np.load(os.path.join(path, "idf.npy")),
              _load(os.path.join(path, "doc_len.npy"), mode),
              _load(os.path.join(path, "tie.npy"), mode), shards, meta["stats"],
              analyzer)
  if params.kind == "lucene":
    index.norms = _load(os.path.join(path, "norms.npy"), mode)
  return index
