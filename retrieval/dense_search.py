"""Exact inner-product top-k over a corpus sharded across a mesh (method.md 4.2: FAISS IndexFlatIP).

Layout: the corpus [N, D] is zero-padded and cut into chunks [n_chunks, C, D]; the chunk axis is
sharded over every mesh axis (device d holds a contiguous run of rows). Each device scans its
chunks: scores [Q, C] = q @ chunk.T, a chunk top-k, and a running top-k merge, so memory stays
O(Q * C) whatever N. The per-device [Q, k] lists are gathered and merged. Every step keeps the
exact k best, so the result equals a brute-force top-k. Inside the kernel equal scores go to the
lower row; `DenseSearcher` then orders equal scores by passage id (retrieval/searcher.py).

Chunk top-k (exact, two-stage): rows of a chunk form C/16 strided blocks; the k blocks with the
largest maxima hold every top-k element (the k-th block maximum is a lower bound on the k-th
score), so one top-k over the block maxima and one over those k*16 scores replace a top-k over C.
`pruned_scan` (opt-in) goes further: see its docstring.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cqr_jax.sharding import put_global
from retrieval.searcher import id_order

BLOCK = 16  # rows per block (strided in `chunk_topk`, contiguous in `pruned_scan`)
MIN_KEEP = 16  # blocks kept per chunk in pass 1 of `pruned_scan`, at least
GROUP = 8  # chunks whose pass-1 candidates are merged at once


def chunk_topk(s_qc: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Exact top-k per row of s [Q, C] -> (values [Q, k], columns [Q, k]); ties: lower column."""
  q, c = s_qc.shape
  nb = c // BLOCK
  if c % BLOCK or nb < 4 * k:
    return lax.top_k(s_qc, k)
  s_qbn = s_qc.reshape(q, BLOCK, nb)  # column = i * nb + j: block j = {j, nb + j, 2 nb + j, ...}
  _, blk_qk = lax.top_k(s_qbn.max(axis=1), k)
  blk_qk = jnp.sort(blk_qk, axis=1)  # ascending, so flat order below is column order
  g_qbk = jnp.take_along_axis(s_qbn, blk_qk[:, None, :], axis=2)
  v_qk, j_qk = lax.top_k(g_qbk.reshape(q, BLOCK * k), k)
  col_qk = (j_qk // k) * nb + jnp.take_along_axis(blk_qk, j_qk % k, axis=1)
  return v_qk, col_qk


def merge_topk(v1, r1, v2, r2, k: int):
  """Top-k of the union of two lists [Q, k1], [Q, k2]; on ties the first list wins."""
  v_qm, r_qm = jnp.concatenate([v1, v2], axis=1), jnp.concatenate([r1, r2], axis=1)
  v_qk, j_qk = lax.top_k(v_qm, k)
  return v_qk, jnp.take_along_axis(r_qm, j_qk, axis=1)


def _chunk_scores(q_qd, chunk_cd, start, n_rows: int, precision):
  """Masked scores [Q, C] of one chunk (rows past the corpus end: -inf)."""
  s_qc = jnp.dot(q_qd, chunk_cd.T, precision=precision, preferred_element_type=jnp.float32)
  row_c = start + jnp.arange(chunk_cd.shape[0], dtype=jnp.int32)
  return jnp.where(row_c[None, :] < n_rows, s_qc, -jnp.inf)


def _init(nq: int, k: int, axes: tuple[str, ...]):
  init = (jnp.full((nq, k), -jnp.inf, jnp.float32), jnp.full((nq, k), -1, jnp.int32))
  return jax.lax.pcast(init, axes, to="varying") if axes else init


def exact_scan(q_qd, chunks_ncd, starts_n, n_rows: int, k: int, precision=None,
               axes: tuple[str, ...] = ()):
  """Scans chunks [n, C, D] (first rows `starts_n`) -> running exact top-k (values, rows).

  `axes`: the shard_map axes the chunks vary over (the scan carry must vary over them too).
  """
  c = chunks_ncd.shape[1]

  def step(carry, xs):
    chunk_cd, start = xs
    v_qk, col_qk = chunk_topk(_chunk_scores(q_qd, chunk_cd, start, n_rows, precision), min(k, c))
    return merge_topk(*carry, v_qk, col_qk + start, k), None

  return lax.scan(step, _init(q_qd.shape[0], k, axes), (chunks_ncd, starts_n))[0]


def keep_for(k: int, n_chunks: int) -> int:
  """Blocks to keep per chunk: a top-k spread evenly puts lam = k / n_chunks hits in a chunk;
  keep lam + 6 sqrt(lam) + 8 (a Poisson tail ~1e-9 per query and chunk), in steps of 8."""
  lam = k / n_chunks
  return max(MIN_KEEP, -(-int(lam + 6 * math.sqrt(lam) + 8) // 8) * 8)


def _keep_blocks(s_qc, start, keep: int):
  """The `keep` contiguous BLOCK-row blocks with the largest maxima -> candidates, largest drop."""
  nq, c = s_qc.shape
  s_qnb = s_qc.reshape(nq, c // BLOCK, BLOCK)
  m_qj, blk_qj = lax.top_k(s_qnb.max(axis=2), keep + 1)
  blk_qj = jnp.sort(blk_qj[:, :keep], axis=1)  # ascending: candidates stay in row order
  v_qjb = jnp.take_along_axis(s_qnb, blk_qj[:, :, None], axis=1)
  r_qjb = start + blk_qj[:, :, None] * BLOCK + jnp.arange(BLOCK, dtype=jnp.int32)
  return v_qjb.reshape(nq, -1), r_qjb.reshape(nq, -1), m_qj[:, keep]


def pruned_scan(q_qd, chunks_ncd, starts_n, n_rows: int, k: int, precision=None,
                axes: tuple[str, ...] = (), keep: int | None = None,
                return_stats: bool = False):
  """Exact top-k in two passes; pass 2 only revisits chunks where pass 1 may have missed a hit.

  Pass 1 keeps, per chunk, the `keep` blocks with the largest maxima (a top-(keep+1) over
  C/BLOCK block maxima instead of a top-k over C) and merges them GROUP chunks at a time; it also
  records the largest dropped block maximum of each chunk. With t = the k-th best kept score (a
  lower bound on the true k-th score), a chunk whose dropped maxima are all < t holds no missed
  hit. Pass 2 rescores the other chunks exactly (lax.cond: skipped at no cost otherwise).
  """
  n, c, d = chunks_ncd.shape
  keep = keep or keep_for(k, n)
  g = GROUP if n % GROUP == 0 else (n if n < GROUP else math.gcd(n, GROUP))
  nq = q_qd.shape[0]

  def group_step(carry, xs):
    def chunk_step(_, xs1):
      chunk_cd, start = xs1
      s_qc = _chunk_scores(q_qd, chunk_cd, start, n_rows, precision)
      return None, _keep_blocks(s_qc, start, keep)

    _, (v_gqm, r_gqm, drop_gq) = lax.scan(chunk_step, None, xs)
    flat = lambda x: x.transpose(1, 0, 2).reshape(nq, -1)  # chunk order = row order
    return merge_topk(*carry, flat(v_gqm), flat(r_gqm), k), drop_gq

  xs = (chunks_ncd.reshape(n // g, g, c, d), starts_n.reshape(n // g, g))
  (v_qk, r_qk), drop = lax.scan(group_step, _init(nq, k, axes), xs)
  drop_nq = drop.reshape(n, nq)
  t_q = v_qk[:, -1]
  redo_n = jnp.any((drop_nq >= t_q[None, :]) & (drop_nq > -jnp.inf), axis=1)

  def fix(carry, xs):
    chunk_cd, start, redo = xs

    def rescore(vr):
      v, r = vr
      inside = (r >= start) & (r < start + c)  # this chunk's pass-1 picks: replaced below
      vc, cc = chunk_topk(_chunk_scores(q_qd, chunk_cd, start, n_rows, precision), min(k, c))
      return merge_topk(jnp.where(inside, -jnp.inf, v), jnp.where(inside, -1, r), vc,
                        cc + start, k)

    return lax.cond(redo, rescore, lambda vr: vr, carry), None

  out = lax.scan(fix, (v_qk, r_qk), (chunks_ncd, starts_n, redo_n))[0]
  return (out, redo_n) if return_stats else out


def local_topk(q_qd, chunks_ncd, starts_n, n_rows: int, k: int, precision=None,
               axes: tuple[str, ...] = (), prune: bool = False):
  """Exact running top-k over chunks [n, C, D]: `exact_scan`, or `pruned_scan` if `prune` and
  the chunks have enough blocks.

  Output rows are sorted by (score desc, row asc).
  """
  n, c = chunks_ncd.shape[:2]
  pruned = prune and c % BLOCK == 0 and c // BLOCK >= 4 * keep_for(k, n)
  scan = pruned_scan if pruned else exact_scan
  v_qk, r_qk = scan(q_qd, chunks_ncd, starts_n, n_rows, k, precision, axes)
  neg_v, r_qk = lax.sort((-v_qk, r_qk), dimension=1, num_keys=2)
  return -neg_v, r_qk


def make_search_fn(mesh: Mesh, n_rows: int, k: int, precision=None, prune: bool = False):
  """jit: (q [Q, D] replicated, chunks, starts sharded on axis 0) -> (values, rows) [Q, k]."""
  axes = tuple(mesh.axis_names)

  def per_device(q_qd, chunks_ncd, starts_n):
    v_qk, r_qk = local_topk(q_qd, chunks_ncd, starts_n, n_rows, k, precision, axes, prune)
    return v_qk[None], r_qk[None]

  local = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axes), P(axes)),
                        out_specs=(P(axes), P(axes)))

  def search(q_qd, chunks_ncd, starts_n):
    v_gqk, r_gqk = local(q_qd, chunks_ncd, starts_n)  # [n_dev, Q, k], device order = row order
    flat = lambda x: x.transpose(1, 0, 2).reshape(x.shape[1], -1)  # [Q, n_dev * k]
    v_qm, r_qm = flat(v_gqk), flat(r_gqk)
    v_qk, j_qk = lax.top_k(v_qm, k)  # ties: earlier device = lower row
    r_qk = jnp.take_along_axis(r_qm, j_qk, axis=1)
    return v_qk, jnp.where(jnp.isneginf(v_qk), -1, r_qk)

  return jax.jit(search, out_shardings=NamedSharding(mesh, P()))  # replicated: every process


def _rows_fn(embeddings):
  """(rows(start, stop) -> float32 [n, D], N, D) for an array, a list of shards or a store."""
  if hasattr(embeddings, "rows"):
    return embeddings.rows, len(embeddings), int(embeddings.dim)
  if isinstance(embeddings, (list, tuple)):
    shards = list(embeddings)
    bounds = np.cumsum([0] + [len(s) for s in shards])
    dim = int(shards[0].shape[1]) if shards else 0

    def rows(start, stop):
      parts = []
      for i, s in enumerate(shards):
        lo, hi = max(start, bounds[i]), min(stop, bounds[i + 1])
        if lo < hi:
          parts.append(np.asarray(s[lo - bounds[i]:hi - bounds[i]], np.float32))
      return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)

    return rows, int(bounds[-1]), dim
  arr = embeddings
  if getattr(arr, "ndim", None) != 2:
    raise ValueError(f"embeddings must be [N, D], got shape {getattr(arr, 'shape', None)}")
  return (lambda a, b: np.asarray(arr[a:b], np.float32)), arr.shape[0], int(arr.shape[1])


class DenseSearcher:
  """Searcher protocol over dense embeddings: `ids`, `search(queries, k) -> (rows, scores)`.

  Args:
    encoder: a `DenseEncoder` for `search(texts)` (None: only `search_embeddings`).
    embeddings: [N, D] array (may be a memmap), a list of [n_i, D] shards, or an `EmbeddingStore`.
    ids: row -> passage id (unique).
    mesh: corpus chunks are spread over all its devices (default: one device); it may span
      processes (each fills its own devices' chunks; see `collective`).
    chunk_size: corpus rows scored at once per device (memory: query_batch * chunk_size * 4 B).
    query_batch: queries per jitted call (fewer are padded to a power of two).
    dtype: corpus dtype on device; float32 keeps the search exact, bfloat16 halves HBM.
    precision: matmul precision (HIGHEST keeps f32 exact on TPU, where the default is bf16).
    prune: use the two-pass `pruned_scan` (same results, narrower top-k calls). Off by default:
      on CPU it ran slower than `exact_scan` (bench/results/dense.md); untried on TPU/GPU.
  """

  def __init__(self, encoder, embeddings, ids: Sequence[str], mesh: Mesh | None = None,
               chunk_size: int = 32768, query_batch: int = 1024, dtype=jnp.float32,
               precision=lax.Precision.HIGHEST, prune: bool = False):
    rows, n, dim = _rows_fn(embeddings)
    if n == 0:
      raise ValueError("DenseSearcher: empty corpus (0 embeddings)")
    if len(ids) != n:
      raise ValueError(f"DenseSearcher: {len(ids)} ids for {n} embeddings")
    if len(set(ids)) != n:
      seen = set()
      dup = next(i for i in ids if i in seen or seen.add(i))
      raise ValueError(f"DenseSearcher: duplicate passage id {dup!r}")
    if encoder is not None and getattr(encoder, "dim", dim) != dim:
      raise ValueError(f"DenseSearcher: encoder dim {encoder.dim} != embeddings dim {dim}")
    self.encoder, self.ids, self.dim, self.n = encoder, list(ids), dim, n
    self._id_rank = id_order(self.ids)
    self.mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()[:1]), ("data",))
    self.query_batch, self.precision, self.prune = int(query_batch), precision, prune
    n_dev = self.mesh.size
    per_dev = -(-n // n_dev)
    n_local = -(-per_dev // int(chunk_size))
    if n_local > GROUP:  # whole groups for pruned_scan; even chunks keep the padding small
      n_local = -(-n_local // GROUP) * GROUP
    self.chunk = -(-per_dev // n_local // BLOCK) * BLOCK if per_dev >= BLOCK else per_dev
    n_chunks = n_local * n_dev
    axes = tuple(self.mesh.axis_names)
    sharding = NamedSharding(self.mesh, P(axes))
    c = self.chunk

    def fill(index):
      sl = index[0]
      lo, hi = (sl.start or 0), (sl.stop if sl.stop is not None else n_chunks)
      out = np.zeros(((hi - lo) * c, dim), np.float32)
      got = rows(min(lo * c, n), min(hi * c, n))
      out[:len(got)] = got
      return out.reshape(hi - lo, c, dim).astype(dtype, copy=False)

    self.chunks = jax.make_array_from_callback((n_chunks, c, dim), sharding, fill)
    self.starts = jax.device_put(np.arange(n_chunks, dtype=np.int32) * c, sharding)
    self._q_sharding = NamedSharding(self.mesh, P())
    self._fns: dict[int, object] = {}

  @property
  def collective(self) -> bool:
    """True when the mesh spans several processes: every process must then pass the same
    queries to each search (the queries are replicated, the result comes back whole on each)."""
    return len({d.process_index for d in self.mesh.devices.flat}) > 1

  def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Encodes and searches texts -> (rows int64 [Q, k], scores float64 [Q, k]); pad -1 / -inf."""
    if self.encoder is None:
      raise ValueError("DenseSearcher.search needs an encoder; use search_embeddings")
    if len(queries) == 0:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float64)
    return self.search_embeddings(self.encoder.encode(queries), k)

  def search_embeddings(self, q_qd: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of q [Q, D] -> (rows int64 [Q, k], scores float64 [Q, k]), best first.

    Equal scores are ordered by passage id (retrieval/searcher.py); a tie across the k-th
    place keeps the lower row.
    """
    q_qd = np.asarray(q_qd, np.float32)
    if q_qd.ndim != 2 or q_qd.shape[1] != self.dim:
      raise ValueError(f"query embeddings must be [Q, {self.dim}], got {q_qd.shape}")
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    if k not in self._fns:
      self._fns[k] = make_search_fn(self.mesh, self.n, k, self.precision, self.prune)
    rows_qk = np.full((len(q_qd), k), -1, np.int64)
    scores_qk = np.full((len(q_qd), k), -np.inf, np.float64)
    for s in range(0, len(q_qd), self.query_batch):
      qb = q_qd[s:s + self.query_batch]
      pad = min(self.query_batch, 1 << max(len(qb) - 1, 0).bit_length())
      qp = np.zeros((pad, self.dim), np.float32)
      qp[:len(qb)] = qb
      qp = qp.astype(self.chunks.dtype)
      qj = put_global(qp, self._q_sharding)
      v, r = self._fns[k](qj, self.chunks, self.starts)
      scores_qk[s:s + len(qb)] = np.asarray(v)[:len(qb)]
      rows_qk[s:s + len(qb)] = np.asarray(r)[:len(qb)]
    tie_qk = np.where(rows_qk >= 0, self._id_rank[rows_qk], np.iinfo(np.int32).max)
    order = np.lexsort((tie_qk, -scores_qk), axis=1)  # score desc, then passage id
    return np.take_along_axis(rows_qk, order, 1), np.take_along_axis(scores_qk, order, 1)

  def memory_bytes(self) -> int:
    """Device bytes of the corpus chunks (all devices)."""
    return int(math.prod(self.chunks.shape) * self.chunks.dtype.itemsize)
