"""Checks a metrics table (train/evaluate.py rows) against pytrec_eval on its TREC run files."""

import json
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


def _parsed_qids(runs_dir: str, run_file: str, run: dict) -> set:
  """The queries whose output parsed: from the policy's rewrites file beside its run, or every
  query of a baseline's run."""
  path = os.path.join(runs_dir, "rewrites_" + run_file[len("run_"):-len(".trec")] + ".jsonl")
  if not os.path.exists(path):
    return set(run)
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return {r["qid"] for r in rows if r["scored"]}


def assert_rows_equal_pytrec_eval(rows, runs_dir: str, cfg) -> dict[str, float]:
  """Every row's metrics, in the three ways of counting (the run as written, unparsed outputs
  falling back to the question: every query, 0 without a run entry; scored only: the mean over
  parsed outputs, the paper; misses: 0 for each unparsed one), equal pytrec_eval's on the row's
  run files (the mean over its seeds). Returns {system: queries scored}."""
  import pytrec_eval
  qrels, qids = eval_qrels(cfg)
  level = cfg.eval.relevance_level
  scored = {}
  for row in rows:
    got = {k: {c: [] for c in COLUMNS} for k in ("", "|scored", "|misses")}
    counts = []
    for run_file in row["runs"]:
      run = read_run(os.path.join(runs_dir, run_file))
      run = {q: {p: float(s) for p, s in d.items()} for q, d in run.items() if q in qrels}
      per_q = pytrec_eval.RelevanceEvaluator(qrels, PYTREC_MEASURES,
                                             relevance_level=level).evaluate(run)
      parsed = _parsed_qids(runs_dir, run_file, run) & set(qids)
      counts.append(len(parsed))
      for c in COLUMNS:
        value = {q: per_q[q][c] if q in per_q else 0.0 for q in qids}
        got[""][c].append(sum(value.values()) / len(qids))
        got["|scored"][c].append(np.mean([value[q] for q in parsed]) if parsed else 0.0)
        got["|misses"][c].append(sum(value[q] for q in parsed) / len(qids))
    assert counts, f"{row['system']}: no run files"
    scored[row["system"]] = row["scored"]
    assert row["scored"] == pytest.approx(np.mean(counts)), row["system"]
    for suffix, by in got.items():
      for c in COLUMNS:
        assert row[c + suffix] == pytest.approx(np.mean(by[c]), abs=1e-9), (row["system"], c,
                                                                            suffix)
  return scored
