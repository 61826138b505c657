"""IR metrics with pytrec_eval's (trec_eval's) semantics (method.md 5.4).

- A run's passages are ordered by score descending, ties by passage id DESCENDING (trec_eval's
  comparator; checked against pytrec-eval-terrier in tests). A ranked list (no scores) keeps its
  order.
- Relevant: grade >= 1. NDCG gain = grade (graded); the ideal DCG uses all judged passages.
- Only queries both in the run and in the qrels are scored (as pytrec_eval, and so as the paper's
  averages); `misses_as_zero=True` also scores queries with qrels but no run entry as 0.
Metric names: "recip_rank" (full run; with top-100 runs this is the paper's "MRR@3" column),
"mrr_cut_K" (true MRR@K), "ndcg_cut_K", "recall_K" (fractional with several golds).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

PAPER_METRICS = ("recip_rank", "ndcg_cut_3", "recall_10", "recall_100")
ALL_METRICS = ("recip_rank", "mrr_cut_3", "ndcg_cut_3", "recall_10", "recall_100")

Run = Mapping[str, Mapping[str, float] | Sequence[str]]


def order_run(docs: Mapping[str, float] | Sequence[str]) -> list[str]:
  """Passage ids best first: score descending, then id descending (trec_eval)."""
  if isinstance(docs, Mapping):
    return [p for p, _ in sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]
  return list(docs)


def _parse(name: str) -> tuple[str, int | None]:
  if name == "recip_rank":
    return name, None
  for prefix in ("mrr_cut_", "ndcg_cut_", "recall_"):
    if name.startswith(prefix) and name[len(prefix):].isdigit():
      return prefix[:-1], int(name[len(prefix):])
  raise ValueError(f"unknown metric {name!r}; use recip_rank, mrr_cut_K, ndcg_cut_K, recall_K")


def query_metrics(ranked: Sequence[str], grades: Mapping[str, int],
                  metrics: Sequence[str] = ALL_METRICS, relevance_level: int = 1) -> dict:
  """Metrics of one ranked list against one query's judgements {pid: grade}."""
  rel = [grades.get(p, 0) for p in ranked]
  num_rel = sum(1 for g in grades.values() if g >= relevance_level)
  first = next((i + 1 for i, g in enumerate(rel) if g >= relevance_level), None)
  out = {}
  for name in metrics:
    kind, k = _parse(name)
    if kind == "recip_rank":
      out[name] = 1.0 / first if first else 0.0
    elif kind == "mrr_cut":
      out[name] = 1.0 / first if first and first <= k else 0.0
    elif kind == "recall":
      hit = sum(1 for g in rel[:k] if g >= relevance_level)
      out[name] = hit / num_rel if num_rel else 0.0
    else:  # ndcg_cut
      dcg = sum(g / math.log2(i + 2) for i, g in enumerate(rel[:k]) if g > 0)
      ideal = sorted((g for g in grades.values() if g > 0), reverse=True)[:k]
      idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
      out[name] = dcg / idcg if idcg > 0 else 0.0
  return out


def evaluate(run: Run, qrels: Mapping[str, Mapping[str, int]],
             metrics: Sequence[str] = ALL_METRICS, misses_as_zero: bool = False,
             relevance_level: int = 1) -> dict[str, dict[str, float]]:
  """Per-query metrics {metric: {qid: value}} over queries in both run and qrels.

  Args:
    run: {qid: {pid: score}} (a TREC run, cqr_jax.data.trec.read_run) or {qid: [pid, ...]}.
    qrels: {qid: {pid: grade}}.
    misses_as_zero: also score qrels queries absent from the run, as 0.
  """
  for m in metrics:
    _parse(m)
  out: dict[str, dict[str, float]] = {m: {} for m in metrics}
  for qid, grades in qrels.items():
    if qid in run:
      values = query_metrics(order_run(run[qid]), grades, metrics, relevance_level)
    elif misses_as_zero:
      values = dict.fromkeys(metrics, 0.0)
    else:
      continue
    for m, v in values.items():
      out[m][qid] = v
  return out


def mean_metrics(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  """{metric: mean over the scored queries} (numpy mean, as the paper's scripts); NaN if none."""
  return {m: float(np.mean(list(v.values()))) if v else float("nan")
          for m, v in per_query.items()}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], samples: int = 10_000,
                     seed: int = 0, level: float = 0.95) -> dict[str, float]:
  """Paired bootstrap of mean(a) − mean(b) over the same queries (a percentile interval).

  Resamples query indices with replacement `samples` times (numpy's default_rng(seed)), so one
  seed gives one interval. Returns {"delta", "lo", "hi", "p_le_0"}: the observed difference, the
  interval's ends, and the fraction of resamples at or below 0."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired_bootstrap needs two 1-D arrays over the same queries, got "
                     f"{a.shape} and {b.shape}")
  d = a - b
  if d.size == 0:
    raise ValueError("paired_bootstrap: no queries")
  rng = np.random.default_rng(seed)
  means = np.empty(samples)
  for s0 in range(0, samples, 1000):  # chunks bound the index matrix's memory
    idx = rng.integers(0, d.size, size=(min(1000, samples - s0), d.size))
    means[s0:s0 + len(idx)] = d[idx].mean(axis=1)
  tail = (1.0 - level) / 2 * 100
  lo, hi = np.percentile(means, [tail, 100 - tail])
  return {"delta": float(d.mean()), "lo": float(lo), "hi": float(hi),
          "p_le_0": float(np.mean(means <= 0))}
