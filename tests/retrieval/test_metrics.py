"""IR metrics equal pytrec_eval's (pytrec-eval-terrier) on random runs and qrels (method.md 5.4)."""

import numpy as np
import pytest
import pytrec_eval

from cqr_jax.data import trec
from cqr_jax.data.types import DataError
from retrieval.metrics import ALL_METRICS, evaluate, mean_metrics, order_run

PYTREC = {"recip_rank": "recip_rank", "ndcg_cut_3": "ndcg_cut_3", "recall_10": "recall_10",
          "recall_100": "recall_100", "ndcg_cut_10": "ndcg_cut_10", "recall_5": "recall_5"}


def _random_case(seed, n_queries=150, n_docs=400):
  """Graded (0-3), multiple and missing golds; tied scores; run-only and qrels-only queries."""
  rng = np.random.default_rng(seed)
  docs = [f"d{i}" for i in range(n_docs)]
  qrels, run = {}, {}
  for q in range(n_queries):
    qid = f"q{q}"
    if q % 10 != 9:  # every tenth query has no qrels (run only)
      judged = rng.choice(n_docs, size=rng.integers(1, 8), replace=False)
      qrels[qid] = {docs[j]: int(rng.integers(0, 4)) for j in judged}
    if q % 7 != 6:  # every seventh query has no run entry
      depth = int(rng.integers(1, 120))
      pool = rng.choice(n_docs, size=depth, replace=False)
      if qid in qrels and rng.random() < 0.7:  # put some judged docs in the run
        pool = np.unique(np.concatenate([pool, [docs.index(p) for p in qrels[qid]][:3]]))
      scores = np.round(rng.normal(size=len(pool)), 1 if q % 2 else 6)  # many ties when rounded
      run[qid] = {docs[j]: float(s) for j, s in zip(pool, scores)}
  return run, qrels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_pytrec_eval(seed):
  run, qrels = _random_case(seed)
  ours = evaluate(run, qrels, metrics=list(PYTREC) + ["mrr_cut_3"])
  ref = pytrec_eval.RelevanceEvaluator(qrels, set(PYTREC.values()) | {"ndcg_cut", "recall"})
  ref = ref.evaluate(run)
  assert set(ours["recip_rank"]) == set(ref)  # only queries in both run and qrels
  for ours_name, ref_name in PYTREC.items():
    for qid, v in ref.items():
      assert abs(ours[ours_name][qid] - v[ref_name]) <= 1e-9, (ours_name, qid)
  for qid, v in ref.items():  # true MRR@3: the reciprocal rank when the first gold is in the top 3
    want = v["recip_rank"] if v["recip_rank"] >= 1 / 3 - 1e-12 else 0.0
    assert ours["mrr_cut_3"][qid] == pytest.approx(want, abs=1e-12)
  means = mean_metrics(ours)
  assert means["recip_rank"] == pytest.approx(np.mean([v["recip_rank"] for v in ref.values()]))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("level", [2, 3])
def test_metrics_equal_pytrec_eval_at_relevance_level(seed, level):
  """TREC CAsT's protocol: grade >= 2 is relevant for MRR and recall; nDCG stays graded."""
  run, qrels = _random_case(seed)
  ours = evaluate(run, qrels, metrics=list(PYTREC), relevance_level=level)
  ref = pytrec_eval.RelevanceEvaluator(qrels, set(PYTREC.values()) | {"ndcg_cut", "recall"},
                                       relevance_level=level).evaluate(run)
  assert set(ours["recip_rank"]) == set(ref)
  for ours_name, ref_name in PYTREC.items():
    for qid, v in ref.items():
      assert abs(ours[ours_name][qid] - v[ref_name]) <= 1e-9, (ours_name, qid, level)
  base = evaluate(run, qrels, metrics=["recip_rank"])["recip_rank"]
  differs = sum(base[q] != ours["recip_rank"][q] for q in base)
  assert differs > 0  # the level changes the scores on this data


def test_ties_ordered_like_trec_eval():
  run = {"q": {"a": 1.0, "b": 1.0, "z": 1.0, "c": 2.0}}
  qrels = {"q": {"a": 1, "b": 1, "c": 0}}
  assert order_run(run["q"]) == ["c", "z", "b", "a"]  # score desc, then id DESCENDING
  ref = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)
  assert ref["q"]["recip_rank"] == evaluate(run, qrels)["recip_rank"]["q"] == pytest.approx(1 / 3)


def test_ranked_lists_and_misses_as_zero():
  qrels = {"q1": {"a": 2, "b": 1}, "q2": {"x": 1}, "q3": {"y": 0}}
  run = {"q1": ["b", "c", "a"], "q3": ["y"], "q4": ["a"]}
  per = evaluate(run, qrels)
  assert set(per["recip_rank"]) == {"q1", "q3"}  # q2: no run; q4: no qrels
  assert per["recip_rank"]["q1"] == 1.0 and per["recall_10"]["q1"] == 1.0
  assert per["recip_rank"]["q3"] == 0.0  # no relevant passage: 0, as pytrec_eval
  dcg = 1 / 1 + 2 / np.log2(4)
  idcg = 2 / 1 + 1 / np.log2(3)
  assert per["ndcg_cut_3"]["q1"] == pytest.approx(dcg / idcg)
  zero = evaluate(run, qrels, misses_as_zero=True)
  assert set(zero["recip_rank"]) == {"q1", "q2", "q3"} and zero["recall_100"]["q2"] == 0.0
  assert mean_metrics(zero)["recip_rank"] == pytest.approx(1 / 3)
  assert set(ALL_METRICS) == set(per)
  with pytest.raises(ValueError, match="unknown metric"):
    evaluate(run, qrels, metrics=["map"])


def test_fractional_recall_with_several_golds():
  qrels = {"q": {f"g{i}": 1 for i in range(4)}}
  ranked = ["g0", "x"] + [f"n{i}" for i in range(20)] + ["g1"]
  per = evaluate({"q": ranked}, qrels)
  assert per["recall_10"]["q"] == 0.25 and per["recall_100"]["q"] == 0.5


def test_trec_files_round_trip_and_bad_qrels_line(tmp_path):
  run, qrels = _random_case(5, n_queries=20)
  trec.write_qrels(tmp_path / "q.trec", qrels)
  ranked = {q: order_run(d) for q, d in run.items()}
  trec.write_run(tmp_path / "run.trec", ranked)
  back = evaluate(trec.read_run(tmp_path / "run.trec"), trec.read_qrels(tmp_path / "q.trec"))
  assert back == evaluate(ranked, qrels)
  bad = tmp_path / "bad.trec"
  bad.write_text("q1 0 d1 1\nq1 0 d2\n")
  with pytest.raises(DataError, match=r"bad\.trec:2: .*4 fields"):
    trec.read_qrels(bad)


def test_paired_bootstrap_against_scipy():
  """The percentile interval of the mean paired difference equals scipy.stats.bootstrap's
  (another resampler: within 0.01 at 10,000 resamples), is seeded, and is exact for a constant
  difference."""
  from scipy import stats

  from retrieval.metrics import paired_bootstrap
  rng = np.random.default_rng(0)
  b = rng.uniform(size=300)
  a = np.clip(b + rng.normal(0.05, 0.3, size=300), 0, 1)
  ours = paired_bootstrap(a, b, samples=10_000, seed=1)
  ref = stats.bootstrap((a - b,), np.mean, n_resamples=10_000, method="percentile",
                        random_state=2).confidence_interval
  assert ours["delta"] == pytest.approx(np.mean(a - b))
  assert ours["lo"] == pytest.approx(ref.low, abs=0.01)
  assert ours["hi"] == pytest.approx(ref.high, abs=0.01)
  assert ours["lo"] < ours["delta"] < ours["hi"]
  assert paired_bootstrap(a, b, seed=1) == ours
  same = paired_bootstrap(b + 0.25, b)
  assert same["lo"] == pytest.approx(0.25) and same["hi"] == pytest.approx(0.25)
  assert same["p_le_0"] == 0.0
  with pytest.raises(ValueError, match="same queries"):
    paired_bootstrap(a, b[:5])
