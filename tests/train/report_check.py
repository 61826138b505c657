"""Checks a metrics table (train/evaluate.py rows) against pytrec_eval on its TREC run files."""

import os

import numpy as np
import pytest

from cqr_jax.data import load_dataset
from cqr_jax.data.trec import read_run

PYTREC_MEASURES = {"recip_rank", "ndcg_cut.3", "recall.10", "recall.100"}
COLUMNS = ("recip_rank", "ndcg_cut_3", "recall_10", "recall_100")  # ours = pytrec's result keys


def eval_qrels(cfg):
  """(qrels of the evaluated test turns, their qids in order) of a synthetic-data run."""
  ds = load_dataset("synthetic", cfg.data.test_split, size=cfg.data.size, seed=cfg.data.seed)
  qids = [t.qid for t in ds.turns][:cfg.data.max_test_turns or None]
  return {q: ds.qrels[q] for q in qids}, qids


def assert_rows_equal_pytrec_eval(rows, runs_dir: str, cfg) -> dict[str, float]:
  """Every row's metrics, both ways of counting unparsable outputs (dropped: the mean over
  scored queries, the paper; misses: 0 for each unscored one), equal pytrec_eval's on the row's
  run files (the mean over its seeds). Returns {system: queries scored}."""
  import pytrec_eval
  qrels, qids = eval_qrels(cfg)
  scored = {}
  for row in rows:
    dropped, misses, counts = {c: [] for c in COLUMNS}, {c: [] for c in COLUMNS}, []
    for run_file in row["runs"]:
      run = read_run(os.path.join(runs_dir, run_file))
      run = {q: {p: float(s) for p, s in d.items()} for q, d in run.items() if q in qrels}
      per_q = pytrec_eval.RelevanceEvaluator(qrels, PYTREC_MEASURES).evaluate(run)
      counts.append(len(per_q))
      for c in COLUMNS:
        vals = [v[c] for v in per_q.values()]
        dropped[c].append(np.mean(vals) if vals else 0.0)
        misses[c].append(np.sum(vals) / len(qids))
    assert counts, f"{row['system']}: no run files"
    scored[row["system"]] = row["scored"]
    assert row["scored"] == pytest.approx(np.mean(counts)), row["system"]
    for c in COLUMNS:
      assert row[c] == pytest.approx(np.mean(dropped[c]), abs=1e-9), (row["system"], c)
      assert row[f"{c}|misses"] == pytest.approx(np.mean(misses[c]), abs=1e-9), (row["system"], c)
  return scored
