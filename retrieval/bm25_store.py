"""A BM25 index of a whole collection on disk or in Cloud Storage, with a manifest that lets
every stage check it against its own corpus and settings before using it (issue 33).

Layout of an index folder (a local path or a gs:// URI):
  manifest.json    {"format": "cqr-jax-bm25-index", "version", "kind", "params", "corpus",
                    "parts", "files", "build"}; written last, so a partial folder has none
  all/ | domain-DDD/  one `index_io` directory per part: the whole collection, or one per domain
                    (retrieval.within_domain with MTRAG-style passages)

`corpus` is the collection's fingerprint (passages and a BLAKE2b hash of their ids and contents in
row order, `bm25_build.Fingerprint`); each part has its own. `files` lists every file of every part
with its size and BLAKE2b hash. `open_index` refuses, with a one-line ValueError naming the folder
and what differs, an index of another kind, analyzer, k1/b or corpus, or with a file missing or of
the wrong size; a gs:// index is first copied to a local cache (hashes checked) and memory-mapped
from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Iterable

from retrieval import bm25 as bm25_lib
from retrieval import index_io
from retrieval import manifest as manifest_lib
from retrieval.bm25_build import INT32_POSTINGS, Fingerprint, StreamBuilder
from retrieval.manifest import MANIFEST

# Version 2: the Lucene-style tokenizer follows StandardTokenizer on non-ASCII text (session 23);
# indexes of version 1 hold other tokens for it and are refused.
FORMAT, VERSION = "cqr-jax-bm25-index", 2
WHOLE = "all"
REBUILD = "rebuild it with `cqr-jax index`"


def _paths():
  from cqr_jax import paths  # etils/fsspec: imported only where a path may be a URI
  return paths


def _is_uri(p: str) -> bool:
  return "://" in p


def params_dict(p: bm25_lib.BM25Params) -> dict:
  return {"kind": p.kind, "k1": p.k1, "b": p.b, "epsilon": p.epsilon, "analyzer": p.analyzer}


# ------------------------------------------------------------------------------------ corpus
def corpus_fingerprint(passages: Iterable, by_domain: bool) -> dict:
  """{"num_docs", "blake2b", "domains": {domain: {"num_docs", "blake2b"}} or None} of passages
  (objects with `pid`, `contents`, `domain`), in one pass. With `by_domain`, passages without a
  domain among others with one are refused (as retrieval.domains.rows_by_domain)."""
  whole, parts, missing = Fingerprint(), {}, None
  for p in passages:
    whole.add(p.pid, p.contents)
    d = p.domain if by_domain else None
    if d is None:
      missing = missing or p.pid
    else:
      parts.setdefault(d, Fingerprint()).add(p.pid, p.contents)
  _check_domains(parts, missing)
  out = whole.value()
  out["domains"] = {d: parts[d].value() for d in sorted(parts)} or None
  return out


def _check_domains(parts: dict, missing: str | None) -> None:
  if parts and missing is not None:
    raise ValueError(f"some passages have no domain (e.g. {missing!r}) while others do "
                     f"({sorted(parts)}): give every passage a domain, or set "
                     "retrieval.within_domain=false")


def cached_fingerprint(collection, by_domain: bool) -> dict:
  """`corpus_fingerprint` of a collection; a `FileCollection`'s is kept beside its offset index
  (`bm25_fingerprint.json`), valid while its source files keep their size and mtime."""
  key = _collection_key(collection)
  if key is None or by_domain:
    return corpus_fingerprint(collection, by_domain)
  path = os.path.join(collection.index_dir, "bm25_fingerprint.json")
  try:
    with open(path, encoding="utf-8") as f:
      cached = json.load(f)
    if cached.get("key") == key:
      return cached["fingerprint"]
  except (OSError, ValueError):
    pass
  fp = corpus_fingerprint(collection, False)
  remember_fingerprint(collection, fp)
  return fp


def remember_fingerprint(collection, fp: dict) -> None:
  """Stores a FileCollection's fingerprint beside its offset index (no-op for others)."""
  key = _collection_key(collection)
  if key is None or fp.get("domains"):
    return
  try:
    tmp = os.path.join(collection.index_dir, f"bm25_fingerprint.json.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"key": key, "fingerprint": fp}, f)
    os.replace(tmp, os.path.join(collection.index_dir, "bm25_fingerprint.json"))
  except OSError:
    pass


def _collection_key(collection) -> dict | None:
  """What a FileCollection's passages depend on (source files' size and mtime, format), or
  None for a collection not streamed from files."""
  files, index_dir = getattr(collection, "files", None), getattr(collection, "index_dir", None)
  if not files or not index_dir:
    return None
  sigs = []
  for f in files:
    st = os.stat(f)
    sigs.append({"path": os.path.abspath(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
  return {"files": sigs, **{k: getattr(collection, k, None)
                            for k in ("fmt", "skip_header", "renumber")}}


# ------------------------------------------------------------------------------------- build
def build_index(passages: Iterable, out: str, params: bm25_lib.BM25Params, *,
                by_domain: bool = False, max_postings: int = 20_000_000,
                shard_postings: int = INT32_POSTINGS, work_dir: str | None = None,
                overwrite: bool = False, progress: bool = True, total: int | None = None) -> dict:
  """Streams `passages` (objects with `pid`, `contents`, `domain`) once into an index at `out`
  (a local folder or a gs:// URI); returns the manifest.

  Args:
    by_domain: one part per passage domain (retrieval.within_domain), else one for all.
    max_postings: tokens buffered (over all parts) before they are sorted into run files; also
      the postings per merge block. Bounds the postings' memory.
    shard_postings: most tokens per document shard.
    work_dir: local folder for the run files and, for a URI, the staged index (default: beside
      a local `out`, else the system's temporary folder).
    overwrite: replace an index already at `out`.
  """
  from tqdm.auto import tqdm
  paths = _paths()
  remote = _is_uri(out)
  out = paths.absolute(out)
  if not overwrite and (paths.exists(os.path.join(out, MANIFEST)) or paths.nonempty_dir(out)):
    raise ValueError(f"{out} holds files already: pass --overwrite to replace the index")
  if remote:
    stage = tempfile.mkdtemp(prefix="cqr-jax-bm25-", dir=work_dir)
  else:
    stage = out.rstrip("/") + ".partial"
    shutil.rmtree(stage, ignore_errors=True)
  work = os.path.join(work_dir or stage, f"runs-{os.getpid()}")
  builders: dict[str | None, tuple[str, StreamBuilder]] = {}
  whole, missing = Fingerprint(), None
  try:
    for p in tqdm(passages, total=total, desc="BM25 index", unit="doc", disable=not progress):
      d = p.domain if by_domain else None
      if d is None and missing is None:
        missing = p.pid
      if d not in builders:
        name = WHOLE if d is None else f"domain-{len(builders):03d}"
        builders[d] = name, StreamBuilder(os.path.join(stage, name), params,
                                          os.path.join(work, name), max_postings, shard_postings)
      text = p.contents
      whole.add(p.pid, text)
      builders[d][1].add(p.pid, text)
      if len(builders) > 1 and sum(b.buffered for _, b in builders.values()) >= max_postings:
        for _, b in builders.values():
          b.flush()
    if not builders:
      raise ValueError("cannot build a BM25 index over an empty corpus (0 passages)")
    if None in builders and len(builders) > 1:
      _check_domains({d: 1 for d in builders if d is not None}, missing)
    parts = []
    for d in sorted(builders, key=lambda x: (x is not None, x or "")):
      name, b = builders[d]
      info = b.finish()
      parts.append({"dir": name, "domain": d, "num_docs": info["num_docs"],
                    "blake2b": info["fingerprint"]["blake2b"],
                    "num_postings": info["num_postings"], "num_shards": info["num_shards"]})
  except BaseException:
    for _, b in builders.values():
      b.abort()
    shutil.rmtree(stage, ignore_errors=True)
    raise
  finally:
    shutil.rmtree(work, ignore_errors=True)
  files = []
  for root, _, names in sorted(os.walk(stage)):
    for n in sorted(names):
      f = os.path.join(root, n)
      files.append({"path": os.path.relpath(f, stage).replace(os.sep, "/"),
                    "bytes": os.path.getsize(f), "blake2b": manifest_lib.file_hash(f)})
  corpus = whole.value()
  pd = params_dict(params)
  manifest = {"format": FORMAT, "version": VERSION, "kind": pd.pop("kind"), "params": pd,
              "corpus": corpus, "parts": parts, "files": files,
              "build": {"max_postings_in_memory": max_postings, "shard_postings": shard_postings}}
  with open(os.path.join(stage, MANIFEST), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  if remote:
    if paths.isdir(out):
      paths.rmtree(out)
    for item in files:
      paths.copy(os.path.join(stage, item["path"]), os.path.join(out, item["path"]))
    paths.copy(os.path.join(stage, MANIFEST), os.path.join(out, MANIFEST))  # last
    shutil.rmtree(stage, ignore_errors=True)
  else:
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(stage, out)
  return manifest


# -------------------------------------------------------------------------------------- open
def read_manifest(path: str, local_dir: str | None = None) -> dict:
  """The manifest of the index at `path` (read from `local_dir` when given)."""
  return manifest_lib.read(path, fmt=FORMAT, version=VERSION, what="BM25",
                           build_cmd="cqr-jax index", local_dir=local_dir)


def check_params(path: str, m: dict, params: bm25_lib.BM25Params) -> None:
  """Refuses an index built with another kind, analyzer, k1, b or epsilon."""
  want = params_dict(params)
  got = {"kind": m.get("kind"), **m.get("params", {})}
  diff = [k for k in ("kind", "analyzer", "k1", "b", "epsilon") if got.get(k) != want[k]]
  if diff:
    field = {"kind": "retrieval.bm25", "analyzer": "retrieval.analyzer", "k1": "retrieval.k1",
             "b": "retrieval.b", "epsilon": "BM25Params.epsilon"}
    built = ", ".join(f"{k}={got.get(k)!r}" for k in diff)
    mine = ", ".join(f"{k}={want[k]!r}" for k in diff)
    raise ValueError(f"{path}: BM25 index built with {built}, this run has {mine} "
                     f"({', '.join(field[k] for k in diff)}): {REBUILD}")


def check_files(path: str, m: dict, local_dir: str) -> None:
  """Refuses an index with a listed file missing or of another size than the manifest's."""
  for item in m["files"]:
    f = os.path.join(local_dir, item["path"])
    if not os.path.isfile(f):
      raise ValueError(f"{path}: {item['path']} is missing (an incomplete copy?): copy the whole "
                       f"folder again, or {REBUILD}")
    size = os.path.getsize(f)
    if size != item["bytes"]:
      raise ValueError(f"{path}: {item['path']} has {size} bytes, the manifest says "
                       f"{item['bytes']} (truncated or damaged): copy it again, or {REBUILD}")


def _short(c: dict) -> str:
  return f"{c['num_docs']} passages, fingerprint {c['blake2b'][:12]}"


def _split(domains: list) -> str:
  return f"one part per domain {domains}" if domains else "one part for the whole collection"


def check_corpus(path: str, m: dict, corpus: dict) -> None:
  """Refuses an index of another corpus, or split by domain differently than the run."""
  if (m["corpus"]["num_docs"], m["corpus"]["blake2b"]) != (corpus["num_docs"], corpus["blake2b"]):
    raise ValueError(f"{path}: BM25 index of another corpus ({_short(m['corpus'])}; this run's "
                     f"collection: {_short(corpus)}): {REBUILD} for this data.dataset")
  got = sorted(p["domain"] for p in m["parts"] if p["domain"] is not None)
  want = sorted(corpus.get("domains") or {})
  if got != want:
    raise ValueError(f"{path}: the index has {_split(got)}, this run retrieves with {_split(want)} "
                     f"(retrieval.within_domain): {REBUILD} with this config")
  for p in m["parts"]:
    if p["domain"] is not None:
      c = corpus["domains"][p["domain"]]
      if (p["num_docs"], p["blake2b"]) != (c["num_docs"], c["blake2b"]):
        raise ValueError(f"{path}: domain {p['domain']!r} holds other passages "
                         f"({_short(p)}; this run: {_short(c)}): {REBUILD}")


def local_copy(uri: str) -> str:
  """A local folder holding the index at `uri` (a gs:// URI): the cached copy when its manifest
  is the same, else a fresh download whose files' sizes and hashes are checked. Processes of
  one host share it (a file lock)."""
  paths = _paths()
  uri = paths.absolute(uri)
  from cqr_jax.input_cache import cache_root, host_lock
  d = os.path.join(cache_root(), "bm25", hashlib.sha1(uri.encode()).hexdigest()[:16])
  remote = read_manifest(uri)
  text = json.dumps(remote, sort_keys=True)
  with host_lock(d + ".lock"):
    mine = os.path.join(d, MANIFEST)
    if os.path.exists(mine):
      with open(mine, encoding="utf-8") as f:
        if json.dumps(json.load(f), sort_keys=True) == text:
          return d
      os.remove(mine)  # the folder is invalid until the new copy is complete
    for item in remote["files"]:
      dst = os.path.join(d, item["path"])
      if (os.path.isfile(dst) and os.path.getsize(dst) == item["bytes"]
          and manifest_lib.file_hash(dst) == item["blake2b"]):
        continue
      src = os.path.join(uri, item["path"])
      if not paths.exists(src):
        raise ValueError(f"{uri}: {item['path']} is missing (an incomplete upload?): {REBUILD}")
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      manifest_lib.fetch_checked(src, dst, item["bytes"], item["blake2b"], REBUILD)
    with open(mine, "w", encoding="utf-8") as f:
      json.dump(remote, f, indent=1)
  return d


def verify_hashes(path: str) -> list[str]:
  """Every listed file whose size or BLAKE2b hash differs from the manifest's (a local index;
  a gs:// one is checked as it is copied)."""
  if _is_uri(path):
    local_copy(path)
    return []
  m = read_manifest(path)
  bad = []
  for item in m["files"]:
    f = os.path.join(path, item["path"])
    if not os.path.isfile(f):
      bad.append(f"{item['path']}: missing")
    elif (os.path.getsize(f), manifest_lib.file_hash(f)) != (item["bytes"], item["blake2b"]):
      bad.append(f"{item['path']}: size or hash differs")
  return bad


def check_index(path: str, params: bm25_lib.BM25Params, corpus_fn) -> tuple[str, dict]:
  """Checks the index at `path` for a run with `params` whose collection's fingerprint
  `corpus_fn()` gives (called only once the cheaper checks passed); returns (local folder,
  manifest). Raises ValueError (one line: the folder and what differs) for a missing manifest,
  another kind/analyzer/k1/b, a missing or resized file, another corpus or domain split."""
  m = read_manifest(path)
  check_params(path, m, params)
  local = local_copy(path) if _is_uri(path) else path
  check_files(path, m, local)
  check_corpus(path, m, corpus_fn())
  return local, m


def part_dirs(local: str, m: dict) -> dict:
  """{domain or None: local index directory} of a checked index."""
  return {p["domain"]: os.path.join(local, p["dir"]) for p in m["parts"]}


def open_index(path: str, params: bm25_lib.BM25Params, corpus_fn) -> tuple[str, dict, dict]:
  """`check_index`, then every part opened memory-mapped: (local folder, {domain or None:
  SparseBM25}, manifest)."""
  local, m = check_index(path, params, corpus_fn)
  return local, load_parts(path, local, m), m


def load_parts(path: str, local: str, m: dict) -> dict:
  """{domain or None: SparseBM25} of a checked index, memory-mapped, ids read on demand."""
  out = {}
  for p in m["parts"]:
    try:
      out[p["domain"]] = index_io.load_index(os.path.join(local, p["dir"]), mmap=True,
                                             lazy_ids=True)
    except (OSError, ValueError) as e:
      msg = " ".join(str(e).split())
      raise ValueError(f"{path}: part {p['dir']} cannot be opened ({msg}): {REBUILD}") from None
  return out
