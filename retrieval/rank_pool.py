"""BM25 search in a pool of worker processes over memory-mapped indexes (retrieval.rank_workers).

Each worker opens the index directories itself (`index_io.load_index`, memory-mapped: the
postings are shared through the page cache, each worker keeps its own vocabulary and score
buffers) and searches a contiguous chunk of a batch's queries; the chunks' results are put back
in order, so a pooled search returns exactly what `SparseBM25.search` returns in-process.

Workers are started with the "spawn" context: the parent may have initialised JAX (threads,
devices), which a forked child must not inherit. They import numpy and `retrieval` only: the
parent's `__main__` is hidden while they start, so a spawned worker does not run the parent's
script again (which would import JAX, or start the program over without a main guard).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import numpy as np

_OPEN: dict = {}  # in a worker: index directory -> SparseBM25


def _open(d: str):
  idx = _OPEN.get(d)
  if idx is None:
    from retrieval import index_io
    idx = _OPEN[d] = index_io.load_index(d, mmap=True, lazy_ids=True)
  return idx


def _init(dirs: Sequence[str], started, pids) -> None:
  for d in dirs:
    _open(d)
  started.wait(timeout=600)  # no worker takes a task before all have started (see RankPool)
  pids.put(os.getpid())


def _search(d: str, queries: list[str], k: int):
  return _open(d).search(queries, k)


def _ping() -> int:
  return os.getpid()


@contextlib.contextmanager
def _bare_main():
  """`__main__` without its file and spec: spawn's children then skip re-running it."""
  main = sys.modules.get("__main__")
  if main is None:
    yield
    return
  saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
  main.__dict__.pop("__file__", None)
  main.__spec__ = None
  try:
    yield
  finally:
    main.__dict__.pop("__spec__", None)
    main.__dict__.update(saved)


class RankPool:
  """`workers` processes that search the index directories `dirs` (opened as they start).

  `search(d, queries, k)` splits the queries into up to `chunks_per_worker * workers`
  contiguous chunks. One pool serves every searcher of a process (e.g. one per domain).
  """

  def __init__(self, workers: int, dirs: Sequence[str], chunks_per_worker: int = 4):
    if workers < 1:
      raise ValueError(f"a rank pool needs at least one worker, got {workers}")
    self.workers = workers
    self.chunks = workers * chunks_per_worker
    ctx = multiprocessing.get_context("spawn")
    # A submit finding no idle worker starts one more, up to `workers`; the barrier keeps every
    # worker busy until all have started, so these pings start them all, here, under _bare_main.
    pids = ctx.Queue()
    self._pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init,
                                     initargs=(list(dirs), ctx.Barrier(workers), pids))
    with _bare_main():
      futures = [self._pool.submit(_ping) for _ in range(workers)]
    for f in futures:
      f.result()  # (an index a worker cannot open breaks the pool: raised here)
    self.pids = sorted(pids.get(timeout=60) for _ in range(workers))

  def search(self, d: str, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    if k <= 0:
      raise ValueError(f"k must be positive, got {k}")
    queries = list(queries)
    if not queries:
      return np.zeros((0, k), np.int64), np.zeros((0, k))
    bounds = np.linspace(0, len(queries), min(self.chunks, len(queries)) + 1).astype(int)
    futures = [self._pool.submit(_search, d, queries[lo:hi], k)
               for lo, hi in zip(bounds[:-1], bounds[1:])]
    parts = [f.result() for f in futures]
    return (np.concatenate([r for r, _ in parts]), np.concatenate([s for _, s in parts]))

  def close(self) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class PooledSearcher:
  """A Searcher over one index directory whose searches run in a RankPool.

  Args:
    pool: the RankPool (its `dirs` should include `d`).
    d: the index directory.
    index: the same index opened in this process (its `ids` map rows to passage ids).
  """

  def __init__(self, pool: RankPool, d: str, index):
    self.pool, self.dir, self.index = pool, d, index
    self.ids = index.ids

  def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    return self.pool.search(self.dir, queries, k)
