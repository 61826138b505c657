"""retrieval.query: what a parsed rewrite sends to the retriever, the same in the GRPO reward,
the SDPW filter and evaluation ("rewrite", the paper; or "question+rewrite")."""

import json

import numpy as np
import pytest

from cqr_jax import config as cfglib
from cqr_jax.data.types import Turn
from cqr_jax.parsing import parse_response, retrieval_query
from cqr_jax.prompts import PromptBuilder
from train import evaluate, grpo, sdpw
from train.rewriting import Rewrite

TURNS = [Turn("c1", 1, "q1", "Where is Alder Castle?", gold_ids=("d1",)),
         Turn("c1", 2, "q2", "When was it built?", gold_ids=("d2",),
              context=(("Where is Alder Castle?", "In X."),))]
OUT = ["<think> a </think>\n<rewrite>Alder Castle place</rewrite>",
       "<think> b </think>\n<rewrite>Alder Castle built</rewrite>"]
WANT = {"rewrite": ["Alder Castle place", "Alder Castle built"],
        "question+rewrite": ["Where is Alder Castle? Alder Castle place",
                             "When was it built? Alder Castle built"]}


class Ranker:  # records the texts it is asked to rank; every one is at rank 1
  def __init__(self):
    self.texts = []

  def ranks(self, texts, qids):
    self.texts += list(texts)
    return np.ones(len(texts), np.int64)


def _rw(i, text, sample=0):
  return Rewrite(turn_index=i, sample=sample, text=text, parsed=parse_response(text),
                 finish_reason="stop", num_tokens=5)


def test_forms_and_an_unknown_one():
  assert retrieval_query("Who?", "Alder Castle owner", "rewrite") == "Alder Castle owner"
  assert retrieval_query("Who?", "Alder Castle owner", "question+rewrite") == (
      "Who? Alder Castle owner")
  with pytest.raises(ValueError, match="retrieval.query='both'"):
    retrieval_query("Who?", "x", "both")


@pytest.mark.parametrize("form", list(WANT))
def test_evaluation_queries(form):
  rewrites = [_rw(0, OUT[0]), _rw(1, "no tags")]
  queries, parsed = evaluate.policy_queries(TURNS, rewrites, "question", "format", form)
  assert queries == {"q1": WANT[form][0], "q2": "When was it built?"}  # fallback: the question
  assert parsed.tolist() == [True, False]


@pytest.mark.parametrize("form", list(WANT))
def test_sdpw_filter_ranks_the_query_and_keeps_the_rewrite(tmp_path, form):
  ranker = Ranker()
  with open(tmp_path / "data", "w") as fdata, open(tmp_path / "done", "w") as fdone:
    sdpw._filter_and_write([_rw(0, OUT[0]), _rw(1, OUT[1])], TURNS, ranker, PromptBuilder(), 1,
                           fdata, fdone, query_form=form)
  assert ranker.texts == WANT[form]
  kept = [json.loads(x) for x in open(tmp_path / "data")]
  assert [k["rewrite"] for k in kept] == WANT["rewrite"]  # the SFT target is the rewrite


@pytest.mark.parametrize("form", list(WANT))
def test_grpo_reward_ranks_the_query(form):
  class Roll:
    texts = [OUT[1], "no tags", OUT[0], OUT[0]]
    prompt_index = np.array([1, 1, 0, 0])
  ranker = Ranker()
  ok, ranks, reward = grpo.score_rollouts(
      ranker, Roll(), np.array(["q2", "q2", "q1", "q1"]), TURNS, cfglib.RunConfig().grpo.reward,
      step=1, n_steps=10, query_form=form)
  assert ok.tolist() == [True, False, True, True]
  assert ranker.texts == [WANT[form][1], None, WANT[form][0], WANT[form][0]]
  assert reward[1] < reward[0] == reward[2]
