"""Evaluation rewrites turns shortest prompt first (eval.prompt_buckets), and every rewrite, run
line and output row still belongs to its own turn, in the split's order."""

import json
import os

import numpy as np

from cqr_jax import config as cfglib
from train import common, evaluate, rewriting


class _Rollouts:
  def __init__(self, texts):
    self.texts = texts
    self.finish_reasons = ["stop"] * len(texts)
    self.completion_lengths = np.full(len(texts), 5)


def test_length_sorted_evaluation_keeps_each_rewrite_with_its_turn(tmp_path, monkeypatch):
  cfg = cfglib.resolve("tiny", None, [f"run_dir={tmp_path / 'run'}", "data.max_test_turns=12",
                                      "eval.batch_prompts=3"])
  turns = common.load_split(cfg, cfg.data.test_split).turns
  assert len(turns) >= 6
  index = {t.qid: i for i, t in enumerate(turns)}

  class Prompts:  # prompt i: token i repeated (7 * i mod 5) + 1 times, so lengths are shuffled
    def token_ids(self, t, tok):
      i = index[t.qid]
      return [i] * ((7 * i) % 5 + 1)

  seen = []

  class Sampler:  # rewrites prompt i as "<turn i's question> zzz" and records the call order
    def generate(self, model, ids, **kw):
      seen.append([len(x) for x in ids])
      return _Rollouts([f"<think> . </think>\n<rewrite>{turns[x[0]].question} zzz</rewrite>"
                        for x in ids])

  monkeypatch.setattr(common, "prompt_builder", lambda *a, **k: Prompts())
  monkeypatch.setattr(rewriting, "make_sampler", lambda *a, **k: Sampler())
  out = str(tmp_path / "eval")
  row, = evaluate.evaluate_policy(cfg, None, None, None, "sorted", out)

  lengths = [n for call in seen for n in call]
  assert lengths == sorted(lengths) and lengths != [(7 * i) % 5 + 1 for i in range(len(turns))]
  lines = [json.loads(x) for x in open(os.path.join(out, "rewrites_sorted_seed0.jsonl"))]
  assert [x["qid"] for x in lines] == [t.qid for t in turns]
  for x, t in zip(lines, turns):
    assert x["question"] == t.question and x["query"] == f"{t.question} zzz"
  assert row["scored"] == len(turns)
