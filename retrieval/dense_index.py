"""A dense index of a whole collection, on disk or in Cloud Storage: its passage embeddings in
shards, with a manifest that every stage checks against its own corpus and encoder (issue 33;
method.md 4.2 stores ANCE passage embeddings in blocks).

Layout of an index folder (a local path or a gs:// URI):
  manifest.json   {"format": "cqr-jax-dense-index", "version", "encoder", "corpus", "dim",
                   "dtype", "shards", "build"}; written last, so a partial folder has none
  emb-00000.npy   [rows, D] float32 embeddings of the collection's rows in order (numpy .npy)
  emb-00000.npy.done  what a finished shard was encoded from (resume)

`corpus` is the collection's fingerprint (`bm25_build.Fingerprint`: passages and a BLAKE2b hash
of their ids and contents in row order, the one the BM25 index records); passage ids are not
stored, they are the collection's. `encoder` is the model folder, pooling, max length, dim and a
BLAKE2b hash of the folder's weight, config and tokenizer files. `shards` lists each file's rows,
size and BLAKE2b hash. One index serves every retrieval.within_domain setting: a domain's
searcher takes its rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Iterable

import numpy as np

from retrieval import manifest as manifest_lib
from retrieval.bm25_build import Fingerprint
from retrieval.manifest import MANIFEST

FORMAT, VERSION = "cqr-jax-dense-index", 1
REBUILD = "rebuild it with `cqr-jax index --dense`"
SHARD = re.compile(r"emb-\d{5}\.npy(\.done)?$")
# Files of a model folder that the embeddings depend on (weights, config, tokenizer).
MODEL_FILES = re.compile(r"(config\.json|sentence_bert_config\.json|tokenizer(_config)?\.json|"
                         r"special_tokens_map\.json|vocab\.(txt|json)|merges\.txt|"
                         r".*\.safetensors|pytorch_model\.bin)$")


def _paths():
  from cqr_jax import paths  # etils/fsspec: imported only where a path may be a URI
  return paths


def _is_uri(p: str) -> bool:
  return "://" in p


def _hash_bytes(b: bytes) -> str:
  return hashlib.blake2b(b, digest_size=16).hexdigest()


# ----------------------------------------------------------------------------------- encoder
_MODEL_HASHES: dict = {}


def model_hash(model_dir: str) -> str:
  """BLAKE2b over the names and contents of a model folder's MODEL_FILES (memoised per process
  while their sizes and mtimes stay)."""
  names = sorted(n for n in os.listdir(model_dir) if MODEL_FILES.match(n)
                 and os.path.isfile(os.path.join(model_dir, n)))
  if not names:
    raise ValueError(f"{model_dir}: no model files (config.json, weights) in "
                     "retrieval.dense_model")
  key = (os.path.abspath(model_dir),
         tuple((n, os.stat(os.path.join(model_dir, n)).st_size,
                os.stat(os.path.join(model_dir, n)).st_mtime_ns) for n in names))
  if key not in _MODEL_HASHES:
    h = hashlib.blake2b(digest_size=16)
    for n in names:
      h.update(n.encode() + b"\0" + manifest_lib.file_hash(os.path.join(model_dir, n)).encode())
    _MODEL_HASHES[key] = h.hexdigest()
  return _MODEL_HASHES[key]


def encoder_info(model_dir: str, pooling: str, max_length: int, dim: int | None = None) -> dict:
  """What an index's embeddings depend on besides the passages (the manifest's `encoder`)."""
  out = {"model": os.path.abspath(model_dir), "pooling": pooling, "max_length": int(max_length),
         "model_blake2b": model_hash(model_dir)}
  if dim is not None:
    out["dim"] = int(dim)
  return out


def default_max_length(model_dir: str, pooling: str) -> int:
  """The max length `DenseEncoder.from_hf` would pick for this folder (no weights read)."""
  from transformers import AutoTokenizer

  from retrieval.dense_encoder import EncoderConfig, _default_max_length
  cfg_path = os.path.join(model_dir, "config.json")
  with open(cfg_path) as f:
    c = EncoderConfig.from_hf(json.load(f), pooling, source=cfg_path)
  return _default_max_length(model_dir, c, AutoTokenizer.from_pretrained(model_dir))


# ------------------------------------------------------------------------------------- build
def _note(encoder: dict, rows: int, corpus: dict) -> dict:
  return {"encoder": encoder, "rows": rows, "corpus": corpus, "dtype": "float32"}


def _write_bytes(path: str, data: bytes) -> None:
  if _is_uri(path):
    with _paths().open_file(path, "wb") as f:
      f.write(data)
    return
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)


def _read_note(path: str) -> dict | None:
  paths = _paths()
  try:
    return json.loads(paths.read_text(path)) if paths.exists(path) else None
  except (OSError, ValueError):
    return None


def _agree(flag: bool) -> bool:
  """Process 0's `flag` on every process (all must take the same branch around a collective)."""
  import jax
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def build_index(passages: Iterable, out: str, encoder, info: dict, *,
                rows_per_shard: int = 262_144, overwrite: bool = False, write: bool = True,
                progress: bool = True, total: int | None = None) -> dict:
  """Streams `passages` (objects with `pid`, `contents`) once into an index at `out` (a local
  folder or a gs:// URI); returns the manifest.

  Passages are read `rows_per_shard` at a time (that many texts and [rows, D] float32 in memory:
  the bound on memory), encoded by `encoder` (a `DenseEncoder`, with a mesh for mesh-parallel
  encoding) and written as one shard. A shard already there whose `.done` note matches its
  passages and the encoder is kept (an interrupted build resumes). `write`: False on processes
  other than 0 of a pod, which encode with it (the batch spans their devices) but write nothing.
  `info`: `encoder_info` of the encoder.
  """
  from tqdm.auto import tqdm
  paths = _paths()
  out = paths.absolute(out)
  if rows_per_shard < 1:
    raise ValueError(f"rows per shard must be >= 1, got {rows_per_shard}")
  if write:
    if paths.exists(os.path.join(out, MANIFEST)):
      if not overwrite:
        raise ValueError(f"{out} holds an index already: pass --overwrite to replace it")
      paths.remove(os.path.join(out, MANIFEST))  # the folder is incomplete from here on
    other = [n for n in paths.listdir(out) if not SHARD.match(n)]
    if other:
      raise ValueError(f"{out} holds other files ({', '.join(sorted(other)[:3])}): pick an "
                       "empty folder or a dense index's")
    paths.makedirs(out)
  info = {**info, "dim": int(encoder.dim)}
  whole, shards, reused = Fingerprint(), [], 0
  ids: list[str] = []
  texts: list[str] = []
  part = Fingerprint()
  bar = tqdm(total=total, desc="dense index", unit="doc", disable=not (progress and write))

  def flush():
    nonlocal part, reused
    name = f"emb-{len(shards):05d}.npy"
    f = os.path.join(out, name)
    note = _note(info, len(texts), part.value())
    old = _read_note(f + ".done") if write and not overwrite else None
    keep = _agree(old is not None and {k: old.get(k) for k in note} == note
                  and _size(f) == old.get("bytes"))
    if keep:  # (on processes other than 0, which write nothing, `old` is None)
      entry = {"file": name, "rows": len(texts), **{k: (old or {}).get(k)
                                                    for k in ("bytes", "blake2b")}}
      reused += 1
    else:
      emb = encoder.encode(texts)
      buf = io.BytesIO()
      np.save(buf, np.ascontiguousarray(emb, np.float32))
      data = buf.getvalue()
      entry = {"file": name, "rows": len(texts), "bytes": len(data), "blake2b": _hash_bytes(data)}
      if write:
        _write_bytes(f, data)
        paths.write_text(f + ".done", json.dumps({**note, "bytes": entry["bytes"],
                                                  "blake2b": entry["blake2b"]}))
    shards.append({**entry, "corpus": note["corpus"]})
    bar.update(len(texts))
    ids.clear()
    texts.clear()
    part = Fingerprint()

  for p in passages:
    whole.add(p.pid, p.contents)
    part.add(p.pid, p.contents)
    ids.append(p.pid)
    texts.append(p.contents)
    if len(texts) == rows_per_shard:
      flush()
  if texts:
    flush()
  bar.close()
  if not shards:
    raise ValueError("cannot build a dense index over an empty corpus (0 passages)")
  import jax
  mesh = getattr(encoder, "mesh", None)
  manifest = {"format": FORMAT, "version": VERSION, "encoder": info, "corpus": whole.value(),
              "dim": info["dim"], "dtype": "float32", "shards": shards,
              "build": {"rows_per_shard": rows_per_shard,
                        "batch_per_device": encoder.batch_size // (mesh.size if mesh else 1),
                        "devices": mesh.size if mesh else 1,
                        "processes": jax.process_count(), "shards_reused": reused}}
  if write:
    for n in paths.listdir(out):  # shards of an earlier, longer build
      m = re.match(r"emb-(\d{5})\.npy", n)
      if m and int(m.group(1)) >= len(shards):
        paths.remove(os.path.join(out, n))
    paths.write_text(os.path.join(out, MANIFEST), json.dumps(manifest, indent=1))
  return manifest


# --------------------------------------------------------------------------------------- check
def read_manifest(path: str) -> dict:
  return manifest_lib.read(path, fmt=FORMAT, version=VERSION, what="dense",
                           build_cmd="cqr-jax index --dense")


def check_encoder(path: str, m: dict, want: dict) -> None:
  """Refuses an index encoded with another pooling, max length or model (its files' hash)."""
  got = m["encoder"]
  field = {"pooling": "retrieval.dense_pooling", "max_length": "the encoder's max length",
           "model_blake2b": "retrieval.dense_model"}
  diff = [k for k in field if got.get(k) != want[k]]
  if diff:
    built = ", ".join(f"{k}={got.get(k)!r}" for k in diff)
    mine = ", ".join(f"{k}={want[k]!r}" for k in diff)
    raise ValueError(f"{path}/{MANIFEST}: dense index encoded with {built} ({got.get('model')}), "
                     f"this run has {mine} ({want['model']}; {', '.join(field[k] for k in diff)})"
                     f": {REBUILD}")


def _size(p: str) -> int | None:
  if not _is_uri(p):
    return os.path.getsize(p) if os.path.isfile(p) else None
  q = _paths().path(p)
  return q.stat().length if q.exists() else None


def check_files(path: str, m: dict) -> None:
  """Refuses an index with a shard missing or of another size than the manifest's."""
  for s in m["shards"]:
    f = os.path.join(path, s["file"])
    size = _size(f)
    if size is None:
      raise ValueError(f"{f}: shard missing (an incomplete copy?): copy the whole folder again, "
                       f"or {REBUILD}")
    if size != s["bytes"]:
      raise ValueError(f"{f}: {size} bytes, the manifest says {s['bytes']} (truncated or "
                       f"damaged): copy it again, or {REBUILD}")


def check_corpus(path: str, m: dict, corpus: dict) -> None:
  c = m["corpus"]
  if (c["num_docs"], c["blake2b"]) != (corpus["num_docs"], corpus["blake2b"]):
    raise ValueError(f"{path}/{MANIFEST}: dense index of another corpus ({c['num_docs']} "
                     f"passages, fingerprint {c['blake2b'][:12]}; this run's collection: "
                     f"{corpus['num_docs']} passages, fingerprint {corpus['blake2b'][:12]}): "
                     f"{REBUILD} for this data.dataset")


def check_index(path: str, want: dict, corpus_fn) -> dict:
  """The manifest of the index at `path`, checked for a run whose encoder is `want`
  (`encoder_info`) and whose collection's fingerprint `corpus_fn()` gives (called last). Raises
  a one-line ValueError naming the file for a missing or foreign manifest, another encoder, a
  missing or resized shard, or another corpus."""
  m = read_manifest(path)
  check_encoder(path, m, want)
  check_files(path, m)
  check_corpus(path, m, corpus_fn())
  return m


def verify_hashes(path: str) -> list[str]:
  """Every shard whose size or BLAKE2b hash differs from the manifest's (reads them all)."""
  m = read_manifest(path)
  bad = []
  for s in m["shards"]:
    f = os.path.join(path, s["file"])
    if _size(f) is None:
      bad.append(f"{s['file']}: missing")
    elif manifest_lib.file_hash(f) != s["blake2b"]:
      bad.append(f"{s['file']}: size or hash differs")
  return bad


# ---------------------------------------------------------------------------------------- load
class IndexStore:
  """The rows of a checked index for `DenseSearcher`: `rows(a, b)` -> float32 [n, D], `dim`,
  `len()`. Shards are opened memory-mapped when first read; a gs:// index's shards are first
  copied to `$CQR_JAX_CACHE/dense/` (size and hash checked), so each host fetches only the
  shards its devices hold."""

  def __init__(self, path: str, manifest: dict):
    self.path, self.manifest = path, manifest
    self.dim = int(manifest["dim"])
    self._bounds = np.cumsum([0] + [s["rows"] for s in manifest["shards"]])
    self._open: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return int(self._bounds[-1])

  def _local(self, s: dict) -> str:
    if not _is_uri(self.path):
      return os.path.join(self.path, s["file"])
    from cqr_jax.input_cache import cache_root, host_lock
    d = os.path.join(cache_root(), "dense", hashlib.sha1(self.path.encode()).hexdigest()[:16])
    os.makedirs(d, exist_ok=True)
    dst = os.path.join(d, f"{s['blake2b']}.npy")
    with host_lock(dst + ".lock"):
      if not os.path.isfile(dst):
        manifest_lib.fetch_checked(os.path.join(self.path, s["file"]), dst, s["bytes"],
                                   s["blake2b"], REBUILD)
    return dst

  def shard(self, i: int) -> np.ndarray:
    if i not in self._open:
      s = self.manifest["shards"][i]
      f = self._local(s)
      try:
        arr = np.load(f, mmap_mode="r")
      except (OSError, ValueError) as e:
        raise ValueError(f"{f}: unreadable shard ({' '.join(str(e).split())}): {REBUILD}") from None
      if arr.shape != (s["rows"], self.dim) or arr.dtype != np.float32:
        raise ValueError(f"{f}: {arr.dtype} {arr.shape}, the manifest says float32 "
                         f"({s['rows']}, {self.dim}): {REBUILD}")
      self._open[i] = arr
    return self._open[i]

  def rows(self, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as float32 [n, D] (reads only the shards it touches)."""
    parts = []
    for i in range(len(self._bounds) - 1):
      lo, hi = max(start, self._bounds[i]), min(stop, self._bounds[i + 1])
      if lo < hi:
        parts.append(np.asarray(self.shard(i)[lo - self._bounds[i]:hi - self._bounds[i]]))
    return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

  def take(self, rows_n: np.ndarray) -> np.ndarray:
    """Rows `rows_n` (ascending) as float32 [n, D]: a domain's embeddings."""
    out = np.empty((len(rows_n), self.dim), np.float32)
    shard_n = np.searchsorted(self._bounds, rows_n, side="right") - 1
    for i in np.unique(shard_n):
      sel = shard_n == i
      out[sel] = self.shard(int(i))[rows_n[sel] - self._bounds[i]]
    return out
