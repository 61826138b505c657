"""BM25 index on disk: plain .npy arrays, text lists and a JSON header (no pickle).

Layout of an index directory (docs/retrieval.md):
  meta.json        {"format": "cqr-jax-bm25", "version": 1, "kind", "params", "stats", "shards"}
  ids.txt          passage id of row r on line r (UTF-8, "\\n"-terminated)
  vocab.txt        term of term id t on line t
  idf.npy          [V] float64 (okapi) / float32 (lucene)
  doc_len.npy      [N] int32 tokens per passage
  tie.npy          [N] int32 rank of each row's id in sorted id order (tie-break)
  norms.npy        [N] uint8 Lucene length bytes (lucene only)
  shard-SSSSS/     indptr.npy [V + 1] int32|int64, rows.npy [P] int32 (row - shard start),
                   tf.npy [P] uint16|int32,
                   value.npy [P] float64 (okapi) | float32 (lucene) (see bm25.Shard)
Arrays of postings are opened memory-mapped (np.load(mmap_mode="r")) unless mmap=False.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from retrieval import bm25 as bm25_lib

FORMAT, VERSION = "cqr-jax-bm25", 1


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


def save_index(index: bm25_lib.SparseBM25, path: str | os.PathLike) -> None:
  """Writes `index` to directory `path` (created if needed; existing files overwritten)."""
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  vocab = [""] * len(index.vocab)
  for term, t in index.vocab.items():
    vocab[t] = term
  _write_lines(os.path.join(path, "ids.txt"), index.ids, "passage id")
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


def load_index(path: str | os.PathLike, mmap: bool = True,
               analyzer=None) -> bm25_lib.SparseBM25:
  """Opens an index written by `save_index`; `analyzer` overrides the one named in meta.json
  (required when the index was built with a custom callable)."""
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
  ids = _read_lines(os.path.join(path, "ids.txt"), meta["num_docs"])
  vocab = {t: i for i, t in enumerate(_read_lines(os.path.join(path, "vocab.txt"),
                                                  meta["num_terms"]))}
  shards = []
  for s, info in enumerate(meta["shards"]):
    d = os.path.join(path, f"shard-{s:05d}")
    arrs = {n: np.load(os.path.join(d, f"{n}.npy"), mmap_mode=mode)
            for n in ("indptr", "rows", "tf", "value")}
    shards.append(bm25_lib.Shard(info["start"], info["num_docs"], **arrs))
  cls = bm25_lib.LuceneBM25 if params.kind == "lucene" else bm25_lib.ExactOkapiBM25
  index = cls(params, ids, vocab, np.load(os.path.join(path, "idf.npy")),
              np.load(os.path.join(path, "doc_len.npy")), np.load(os.path.join(path, "tie.npy")),
              shards, meta["stats"], analyzer)
  if params.kind == "lucene":
    index.norms = np.load(os.path.join(path, "norms.npy"))
  return index
