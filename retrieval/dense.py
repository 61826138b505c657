"""Dense retrieval: corpus encoding into embedding shards on disk, and the public dense API.

On-disk format (a folder, no pickle; method.md 4.2 stores ANCE passage embeddings in blocks):
  manifest.json  {"format": "cqr-jax-dense", "version": 1, "dim": D, "dtype": "float32",
                  "count": N, "meta": {...}, "shards": [{"file": "emb-00000.npy", "rows": n,
                  "ids": [passage ids of those rows, in order]}, ...]}
  emb-XXXXX.npy  [n, D] arrays (numpy .npy), loaded memory-mapped.
Shards are written one at a time (tmp file + rename) with a `.done` note (rows, dim, dtype, hash
of the shard's ids); a rerun with `resume=True` reuses a shard whose note matches, so an
interrupted corpus encoding continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import numpy as np

from retrieval.dense_encoder import DenseEncoder, EncoderConfig, load_bert_encoder  # noqa: F401
from retrieval.dense_search import DenseSearcher  # noqa: F401

FORMAT, VERSION = "cqr-jax-dense", 1


def check_ids(ids: Sequence[str], where: str) -> None:
  """Raises on an empty corpus or a duplicate passage id (naming `where` and the id)."""
  if len(ids) == 0:
    raise ValueError(f"{where}: empty corpus")
  seen: set[str] = set()
  for i, pid in enumerate(ids):
    if pid in seen:
      raise ValueError(f"{where}: duplicate passage id {pid!r} (row {i})")
    seen.add(pid)


class EmbeddingStore:
  """Embedding shards of a folder, memory-mapped; `rows(a, b)` reads a row range."""

  def __init__(self, path: str, manifest: dict, shards: list[np.ndarray]):
    self.path, self.manifest, self.shards = path, manifest, shards
    self.ids = [pid for s in manifest["shards"] for pid in s["ids"]]
    self.dim = int(manifest["dim"])
    self._bounds = np.cumsum([0] + [len(s) for s in shards])

  def __len__(self) -> int:
    return int(self._bounds[-1])

  @classmethod
  def load(cls, path: str | os.PathLike, mmap: bool = True) -> "EmbeddingStore":
    path = os.fspath(path)
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as f:
      m = json.load(f)
    if m.get("format") != FORMAT:
      raise ValueError(f"{mpath}: format {m.get('format')!r} is not {FORMAT!r}")
    shards = []
    for i, s in enumerate(m["shards"]):
      fpath = os.path.join(path, s["file"])
      arr = np.load(fpath, mmap_mode="r" if mmap else None)
      if arr.shape != (s["rows"], m["dim"]) or len(s["ids"]) != s["rows"]:
        raise ValueError(f"{fpath}: shape {arr.shape} / {len(s['ids'])} ids do not match "
                         f"manifest shard {i} ({s['rows']} rows, dim {m['dim']})")
      shards.append(arr)
    store = cls(path, m, shards)
    check_ids(store.ids, mpath)
    return store

  def rows(self, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as float32 [n, D] (reads only the shards it touches)."""
    parts = []
    for i, s in enumerate(self.shards):
      lo, hi = max(start, self._bounds[i]), min(stop, self._bounds[i + 1])
      if lo < hi:
        parts.append(np.asarray(s[lo - self._bounds[i]:hi - self._bounds[i]], np.float32))
    return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

  def array(self) -> np.ndarray:
    """All rows in memory, [N, D] float32."""
    return self.rows(0, len(self))


def _ids_hash(ids: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def encode_corpus(encoder: DenseEncoder, texts: Sequence[str], ids: Sequence[str],
                  out_dir: str | os.PathLike, shard_size: int = 1_000_000,
                  batch_size: int | None = None, dtype: str = "float32",
                  resume: bool = True, progress: bool = True,
                  meta: dict | None = None) -> EmbeddingStore:
  """Encodes `texts` (row i has passage id ids[i]) into shards of `shard_size` rows in out_dir."""
  out_dir = os.fspath(out_dir)
  if len(texts) != len(ids):
    raise ValueError(f"encode_corpus: {len(texts)} texts but {len(ids)} ids")
  check_ids(ids, f"encode_corpus({out_dir})")
  os.makedirs(out_dir, exist_ok=True)
  starts = range(0, len(texts), shard_size)
  if progress:
    from tqdm.auto import tqdm
    starts = tqdm(starts, desc=f"corpus shards -> {out_dir}", unit="shard")
  shards = []
  for n, s in enumerate(starts):
    fname, rows = f"emb-{n:05d}.npy", min(shard_size, len(texts) - s)
    fpath = os.path.join(out_dir, fname)
    key = {"rows": rows, "dim": encoder.dim, "dtype": dtype,
           "ids_sha256": _ids_hash(ids[s:s + rows])}
    if not (resume and _read_json(fpath + ".done") == key and os.path.exists(fpath)):
      emb = encoder.encode(texts[s:s + rows], batch_size=batch_size, progress=progress)
      with open(fpath + ".tmp", "wb") as f:
        np.save(f, emb.astype(dtype))
      os.replace(fpath + ".tmp", fpath)
      with open(fpath + ".done", "w") as f:
        json.dump(key, f)
    shards.append({"file": fname, "rows": rows, "ids": list(ids[s:s + rows])})
  manifest = {"format": FORMAT, "version": VERSION, "dim": encoder.dim, "dtype": dtype,
              "count": len(texts), "max_length": encoder.max_length,
              "pooling": encoder.model.config.pooling, "meta": meta or {}, "shards": shards}
  with open(os.path.join(out_dir, "manifest.json.tmp"), "w") as f:
    json.dump(manifest, f)
  os.replace(os.path.join(out_dir, "manifest.json.tmp"), os.path.join(out_dir, "manifest.json"))
  return EmbeddingStore.load(out_dir)


def searcher_from_store(encoder: DenseEncoder | None, path: str | os.PathLike,
                        **kwargs) -> DenseSearcher:
  """A `DenseSearcher` over a saved embedding folder (kwargs: mesh, chunk_size, ...)."""
  store = EmbeddingStore.load(path)
  return DenseSearcher(encoder, store, store.ids, **kwargs)
