"""`cqr-jax index`: the run's BM25 index, or with --dense its dense index, built once from the
collection (issue 33).

The collection of `data.dataset` is streamed once; postings are sorted into run files whenever
--max-postings-in-memory tokens are buffered, then merged block by block into the index
(retrieval/bm25_build.py). The index is BM25 as the run's retrieval.bm25 / k1 / b / analyzer
define it, one part per domain with retrieval.within_domain on MTRAG-style passages, saved with a
manifest (retrieval/bm25_store.py) to --out or retrieval.bm25_index, a local folder or gs://.
Stages then load it with `--set retrieval.bm25_index=<that folder>` and refuse it if it does not
match their collection or settings. --check re-hashes an existing index and checks it against
this config instead.

--dense: the collection's passage embeddings by retrieval.dense_model / dense_pooling, encoded
with the batch split over every device of the run's mesh (--batch-per-device rows each, on every
process of a pod), written --rows-per-shard at a time (retrieval/dense_index.py) to --out or
retrieval.dense_index; stages load it with `--set retrieval.dense_index=<that folder>`. An
interrupted build resumes: finished shards whose passages and encoder match are kept.
"""

from __future__ import annotations

import logging
import resource
import time

from retrieval.bm25_build import INT32_POSTINGS
from train import common

log = logging.getLogger("cqr_jax")
USES_CONFIG = True


def add_args(p):
  common.stage_args(p)
  p.add_argument("--dense", action="store_true",
                 help="build the dense index of retrieval.dense_model instead of BM25")
  p.add_argument("--out", default=None, metavar="PATH",
                 help="index folder, local or gs:// (default: retrieval.bm25_index, with --dense "
                      "retrieval.dense_index)")
  p.add_argument("--max-postings-in-memory", type=int, default=20_000_000, metavar="N",
                 help="tokens buffered before they are sorted into a run file, and postings per "
                      "merge block: bounds the build's memory (about 30 bytes each; the "
                      "vocabulary and a few tens of bytes per passage come on top)")
  p.add_argument("--shard-postings", type=int, default=INT32_POSTINGS, metavar="N",
                 help="most tokens per document shard (default: the int32 limit)")
  p.add_argument("--rows-per-shard", type=int, default=262_144, metavar="N",
                 help="--dense: passages per shard, read and encoded at once: bounds the build's "
                      "memory (N texts and N x dim float32)")
  p.add_argument("--batch-per-device", type=int, default=64, metavar="N",
                 help="--dense: encoder rows per device per batch (64: the in-memory encoder's "
                      "batch, whose embeddings it then equals bit for bit on CPU)")
  p.add_argument("--work-dir", default=None, metavar="DIR",
                 help="local folder for run files (and the staged index when --out is gs://)")
  p.add_argument("--overwrite", action="store_true", help="replace an index already at --out")
  p.add_argument("--check", action="store_true",
                 help="do not build: re-hash every file of the index at --out and check it "
                      "against this config's collection and BM25 settings")


def run(args) -> int:
  if args.dense:
    return run_dense(args)
  from retrieval import bm25_store
  cfg = common.config_from_args(args)
  out = args.out or cfg.retrieval.bm25_index
  if not out:
    raise ValueError("no index folder: pass --out PATH (a local folder or gs://...), or set "
                     "retrieval.bm25_index")
  if not common.is_main():  # one builder; the other processes of a pod have nothing to do
    return 0
  from cqr_jax.data import load_dataset
  d = cfg.data
  coll = load_dataset(d.dataset, d.train_split, **({"size": d.size, "seed": d.seed}
                                                   if d.dataset == "synthetic" else {})).collection
  params = common.bm25_params(cfg.retrieval)
  split = common.by_domain(cfg, coll)
  if args.check:
    bad = bm25_store.verify_hashes(out)
    if bad:
      raise ValueError(f"{out}: {len(bad)} file(s) differ from the manifest ({'; '.join(bad[:3])})"
                       f": {bm25_store.REBUILD}")
    _, m = bm25_store.check_index(out, params,
                                  lambda: bm25_store.cached_fingerprint(coll, split))
    print(f"{out}: OK ({m['corpus']['num_docs']} passages, {len(m['files'])} files; matches "
          f"{cfg.data.dataset} and {m['kind']} {m['params']})")
    return 0
  t0 = time.time()
  m = bm25_store.build_index(coll, out, params, by_domain=split,
                             max_postings=args.max_postings_in_memory,
                             shard_postings=args.shard_postings, work_dir=args.work_dir,
                             overwrite=args.overwrite, total=len(coll))
  if not split:
    bm25_store.remember_fingerprint(coll, {**m["corpus"], "domains": None})
  size = sum(f["bytes"] for f in m["files"])
  parts = ", ".join(f"{p['domain'] or 'all'}: {p['num_docs']}" for p in m["parts"])
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  log.info("BM25 index of %s built in %.1fs, peak RSS %.2f GiB", cfg.data.dataset,
           time.time() - t0, peak)
  print(f"wrote a {m['kind']} BM25 index of {m['corpus']['num_docs']} passages ({parts}; "
        f"{sum(p['num_postings'] for p in m['parts'])} postings, {size / 2**20:.1f} MiB in "
        f"{len(m['files'])} files) to {out}; use it with --set retrieval.bm25_index={out}")
  return 0


def run_dense(args) -> int:
  from retrieval import dense_index
  from retrieval.dense_encoder import DenseEncoder
  cfg = common.config_from_args(args)
  r = cfg.retrieval
  out = args.out or r.dense_index
  if not out:
    raise ValueError("no index folder: pass --out PATH (a local folder or gs://...), or set "
                     "retrieval.dense_index")
  if not r.dense_model:
    raise ValueError("--dense needs retrieval.dense_model (a local HF folder of the encoder)")
  from cqr_jax.data import load_dataset
  d = cfg.data
  coll = load_dataset(d.dataset, d.train_split, **({"size": d.size, "seed": d.seed}
                                                   if d.dataset == "synthetic" else {})).collection
  want = common.dense_encoder_info(cfg)
  if args.check:
    if not common.is_main():
      return 0
    bad = dense_index.verify_hashes(out)
    if bad:
      raise ValueError(f"{out}: {len(bad)} shard(s) differ from the manifest "
                       f"({'; '.join(bad[:3])}): {dense_index.REBUILD}")
    m = dense_index.check_index(out, want, lambda: common.dense_fingerprint(coll))
    print(f"{out}: OK ({m['corpus']['num_docs']} passages, {len(m['shards'])} shards; matches "
          f"{cfg.data.dataset} and {r.dense_model} {r.dense_pooling})")
    return 0
  if args.batch_per_device < 1:
    raise ValueError(f"--batch-per-device must be >= 1, got {args.batch_per_device}")
  mesh = common.make_mesh(cfg)
  enc = DenseEncoder.from_hf(common.dense_model_dir(cfg), pooling=r.dense_pooling,
                             batch_size=args.batch_per_device * mesh.size, mesh=mesh)
  t0 = time.time()
  m = dense_index.build_index(coll, out, enc, want, rows_per_shard=args.rows_per_shard,
                              overwrite=args.overwrite, write=common.is_main(), total=len(coll))
  if not common.is_main():
    return 0
  size = sum(s["bytes"] for s in m["shards"])
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  log.info("dense index of %s built in %.1fs on %d devices, peak RSS %.2f GiB", cfg.data.dataset,
           time.time() - t0, mesh.size, peak)
  print(f"wrote a dense index of {m['corpus']['num_docs']} passages ({m['dim']} dims, "
        f"{size / 2**20:.1f} MiB in {len(m['shards'])} shards, {m['build']['shards_reused']} "
        f"reused) to {out}; use it with --set retrieval.dense_index={out}")
  return 0
