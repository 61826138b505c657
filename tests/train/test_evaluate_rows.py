"""Evaluation rows: the fallback to the raw question, the three ways of counting, the paired
bootstrap against the raw question, the concatenation baselines and the relevance level."""

import dataclasses

import numpy as np
import pytest

from cqr_jax import config as cfglib
from cqr_jax.data.trec import write_run
from cqr_jax.data.types import Turn
from cqr_jax.parsing import parse_response
from train import common, evaluate
from train.rewriting import Rewrite

TURNS = [Turn("c1", 1, "q1", "Where is Alder Castle?", gold_ids=("d1",)),
         Turn("c1", 2, "q2", "When was it built?", context=(("Where is Alder Castle?", "In X."),),
              gold_ids=("d2",)),
         Turn("c1", 3, "q3", "Who owns it?", gold_ids=("d3",),
              context=(("Where is Alder Castle?", "In X."), ("When was it built?", "1300.")))]


def _rewrite(i, text):
  return Rewrite(turn_index=i, sample=0, text=text, parsed=parse_response(text),
                 finish_reason="stop", num_tokens=5)


def test_unparsed_outputs_fall_back_to_the_question():
  rewrites = [_rewrite(0, "<think> a </think>\n<rewrite> Alder Castle location </rewrite>"),
              _rewrite(1, "no tags at all"), _rewrite(2, "<rewrite> half")]
  queries, parsed = evaluate.policy_queries(TURNS, rewrites, "question")
  assert queries == {"q1": " Alder Castle location ", "q2": "When was it built?",
                     "q3": "Who owns it?"}
  assert parsed.tolist() == [True, False, False]
  queries, parsed = evaluate.policy_queries(TURNS, rewrites, "none")
  assert queries == {"q1": " Alder Castle location "} and parsed.tolist() == [True, False, False]
  with pytest.raises(ValueError, match="eval.fallback='raw'"):
    evaluate.policy_queries(TURNS, rewrites, "raw")


def test_three_ways_of_counting(tmp_path):
  qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 1}}
  run = tmp_path / "run.trec"
  write_run(run, {"q1": ["d1"], "q2": ["x", "d2"], "q3": ["x", "y", "z", "d3"]})
  per_q = evaluate.per_query_metrics(str(run), qrels, ["q1", "q2", "q3"])
  np.testing.assert_allclose(per_q["recip_rank"], [1.0, 0.5, 0.25])
  s = evaluate.summarize_run(per_q, np.array([True, True, False]))
  assert s["recip_rank"] == pytest.approx(1.75 / 3)        # as used: the fallback counts
  assert s["recip_rank|scored"] == pytest.approx(0.75)     # the paper: parsed queries only
  assert s["recip_rank|misses"] == pytest.approx(1.5 / 3)  # unparsed = 0
  assert s["scored"] == 2 and s["queries"] == 3
  write_run(run, {"q1": ["d1"]})  # a query without a run entry scores 0
  np.testing.assert_allclose(evaluate.per_query_metrics(str(run), qrels, ["q1", "q2"])
                             ["recip_rank"], [1.0, 0.0])


def test_bootstrap_against_raw_question():
  cfg = cfglib.RunConfig()
  rng = np.random.default_rng(0)
  raw = rng.uniform(size=200)
  rows = [{"system": "grpo", "per_query_mrr": np.clip(raw + 0.2, 0, 1).tolist()},
          {"system": "baseline:raw", "per_query_mrr": raw.tolist()}]
  evaluate.add_bootstrap(rows, cfg)
  assert 0 < rows[0]["mrr_delta_lo"] < rows[0]["mrr_delta"] < rows[0]["mrr_delta_hi"]
  assert rows[1]["mrr_delta"] == rows[1]["mrr_delta_lo"] == rows[1]["mrr_delta_hi"] == 0.0
  again = [dict(r) for r in rows]
  assert evaluate.add_bootstrap(again, cfg) == rows  # fixed seed
  rows[0]["per_query_mrr"] = rows[0]["per_query_mrr"][:10]
  with pytest.raises(ValueError, match="grpo was scored on 10 queries"):
    evaluate.add_bootstrap(rows, cfg)


def test_concatenation_baselines():
  b = evaluate.baseline_queries(TURNS)
  assert b["raw"]["q3"] == "Who owns it?"
  assert b["previous_question"]["q3"] == "When was it built? Who owns it?"
  assert b["first_question"]["q3"] == "Where is Alder Castle? Who owns it?"
  assert b["all_questions"]["q3"] == "Where is Alder Castle? When was it built? Who owns it?"
  assert b["first_question"]["q1"] == b["previous_question"]["q1"] == "Where is Alder Castle?"


def test_relevance_level_sets_the_scored_turns_and_the_gold_set(monkeypatch):
  """Level 2: a turn whose passages are all of grade 1 is not scored, and a grade-1 passage is
  not a gold for the reward."""
  from cqr_jax.data.collection import MemoryCollection
  from cqr_jax.data.dataset import Dataset
  from cqr_jax.data.types import Passage
  passages = [Passage("d1", "alder castle stands in x"), Passage("d2", "alder castle 1300"),
              Passage("d3", "alder castle owners"), Passage("d4", "alder castle owners today")]
  qrels = {"q1": {"d1": 2}, "q2": {"d2": 1}, "q3": {"d3": 1, "d4": 2}}
  ds = Dataset(name="toy", split="test", turns=TURNS, collection=MemoryCollection(passages),
               qrels=qrels)
  monkeypatch.setattr("cqr_jax.data.load_dataset", lambda *a, **k: ds)
  cfg = dataclasses.replace(cfglib.RunConfig(), data=cfglib.DataSection(dataset="toy"))
  assert [t.qid for t in common.load_split(cfg, "test").turns] == ["q1", "q2", "q3"]
  cfg2 = dataclasses.replace(cfg, eval=cfglib.EvalSection(relevance_level=2))
  assert [t.qid for t in common.load_split(cfg2, "test").turns] == ["q1", "q3"]
  ranks1 = common.build_ranker(cfg, ds, 512).ranks(["alder castle owners"], ["q3"])
  ranks2 = common.build_ranker(cfg2, ds, 512).ranks(["alder castle owners"], ["q3"])
  assert ranks1[0] == 1 and ranks2[0] == 2  # d3 (grade 1) ranks first; d4 is the level-2 gold
