"""Dense exact top-k: DenseSearcher (jitted, chunked) vs faiss-cpu IndexFlatIP, same data, same run.

  python bench/bench_dense.py                      # 1M x 384 f32, 1,024 queries, top-100
  python bench/bench_dense.py --n 100000 --repeats 1

Data: random Gaussian vectors, L2-normalised (like all-MiniLM-L6-v2 embeddings). Reports the
best-of-`repeats` wall time of each (runs interleaved), the ratio, and how many top-k ids agree.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--n", type=int, default=1_000_000)
  ap.add_argument("--dim", type=int, default=384)
  ap.add_argument("--queries", type=int, default=1024)
  ap.add_argument("--k", type=int, default=100)
  ap.add_argument("--chunk", type=int, default=32768)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--faiss-threads", type=int, default=0, help="0: faiss's default")
  ap.add_argument("--prune", action="store_true", help="also time DenseSearcher(prune=True)")
  args = ap.parse_args(argv)

  import faiss
  import jax

  from retrieval.dense_search import DenseSearcher

  if args.faiss_threads:
    faiss.omp_set_num_threads(args.faiss_threads)
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  corpus = unit(rng.standard_normal((args.n, args.dim), dtype=np.float32))
  queries = unit(rng.standard_normal((args.queries, args.dim), dtype=np.float32))
  print(f"corpus {args.n:,} x {args.dim} f32 ({corpus.nbytes / 2**30:.2f} GiB), "
        f"{args.queries} queries, top-{args.k}; jax {jax.__version__} on {jax.devices()[0]}, "
        f"faiss {faiss.__version__} with {faiss.omp_get_max_threads()} threads")

  def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out

  t = time.perf_counter()
  index = faiss.IndexFlatIP(args.dim)
  index.add(corpus)
  t_faiss_build = time.perf_counter() - t

  t = time.perf_counter()
  searcher = DenseSearcher(None, corpus, [str(i) for i in range(args.n)], chunk_size=args.chunk)
  jax.block_until_ready(searcher.chunks)
  t_build = time.perf_counter() - t
  t = time.perf_counter()
  searcher.search_embeddings(queries, args.k)
  t_compile = time.perf_counter() - t
  pruned = copy.copy(searcher)  # same device chunks, two-pass pruned scan
  pruned.prune, pruned._fns = True, {}
  if args.prune:
    pruned.search_embeddings(queries, args.k)
  t_faiss, t_jax, t_one = [], [], []
  for _ in range(args.repeats):  # interleaved, so all see the same machine load
    t, (f_scores, f_rows) = timed(lambda: index.search(queries, args.k))
    t_faiss.append(t)
    t, (rows, scores) = timed(lambda: searcher.search_embeddings(queries, args.k))
    t_jax.append(t)
    if args.prune:
      t, (rows1, _) = timed(lambda: pruned.search_embeddings(queries, args.k))
      t_one.append(t)
      assert (rows1 == rows).all(), "pruned and one-pass scans disagree"
  show = lambda ts: " ".join(f"{t:.3f}" for t in ts)
  print(f"faiss runs: {show(t_faiss)} s; jax runs: {show(t_jax)} s"
        + (f"; jax pruned runs: {show(t_one)} s" if t_one else "")
        + f"; load average {os.getloadavg()[0]:.1f}")
  t_faiss, t_jax = min(t_faiss), min(t_jax)

  same = (rows == f_rows).mean()
  same_set = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(rows, f_rows)])
  print(f"faiss IndexFlatIP: add {t_faiss_build:.2f} s, search {t_faiss:.3f} s "
        f"({args.queries / t_faiss:,.0f} q/s)")
  print(f"DenseSearcher:     to device {t_build:.2f} s, first call {t_compile:.2f} s, "
        f"search {t_jax:.3f} s ({args.queries / t_jax:,.0f} q/s), chunk {searcher.chunk}")
  if t_one:
    print(f"pruned two-pass scan: {min(t_one):.3f} s ({t_faiss / min(t_one):.2f}x faiss)")
  print(f"speed vs faiss: {t_faiss / t_jax:.2f}x; ids equal at {same:.4%} of positions, "
        f"top-{args.k} sets overlap {same_set:.4%}; max |score diff| "
        f"{np.abs(scores - f_scores).max():.2e}")


if __name__ == "__main__":
  main()
