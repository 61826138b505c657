"""`cqr-jax index` on the tiny preset, then retrieval.bm25_index in the stages (issue 33): the GRPO
reward and evaluation's TREC runs from the memory-mapped index (in-process and with two rank
workers) equal the in-memory index's; a mismatched or damaged index is refused at stage start,
before any model loads, with one line saying what differs."""

import os
import pathlib
import shutil

import numpy as np
import pytest

from cqr_jax import config as cfglib
from train import cli, common, evaluate, grpo

OUT = "<think> x </think>\n<rewrite>{}</rewrite>"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("bm25_stage")
  idx = str(root / "idx")
  rc = cli.main(["index", "--preset", "tiny", "--run-dir", str(root / "run"), "--out", idx,
                 "--max-postings-in-memory", "3000", "--shard-postings", "12000"])
  assert rc == 0 and os.path.exists(os.path.join(idx, "manifest.json"))
  assert os.path.isdir(os.path.join(idx, "all", "shard-00001"))  # several shards
  yield root, idx
  common.close_rank_pools()


def _cfg(root, *sets):
  return cfglib.resolve("tiny", None, [f"run_dir={root}/r", "data.max_train_turns=0",
                                       "data.max_test_turns=0", *sets])


VARIANTS = [(), ("retrieval.bm25_index={idx}",),
            ("retrieval.bm25_index={idx}", "retrieval.rank_workers=2")]


def test_grpo_reward_and_evaluation_runs_equal_the_in_memory_index(built, tmp_path):
  root, idx = built
  got = []
  for sets in VARIANTS:
    cfg = _cfg(root, *(s.format(idx=idx) for s in sets))
    common.check_retrieval(cfg, "pipeline")  # what a stage start does
    ds = common.load_split(cfg, cfg.data.train_split)
    turns = ds.turns
    assert len(turns) > 1000

    class Roll:  # every turn rewritten as its conversation so far, and one unparsable output
      texts = [OUT.format(" ".join([q for q, _ in t.context] + [t.question])) for t in turns]
      texts += ["no tags"]
      prompt_index = np.arange(len(turns) + 1) % len(turns)
    ranker = common.build_ranker(cfg, ds, cfg.retrieval.reward_max_words)
    qids = np.array([turns[i].qid for i in Roll.prompt_index])
    ok, ranks, reward = grpo.score_rollouts(ranker, Roll(), qids, turns, cfg.grpo.reward,
                                            step=1, n_steps=2)
    test = common.load_split(cfg, cfg.data.test_split)
    eval_ranker = common.build_ranker(cfg, test, cfg.retrieval.eval_max_words)
    runs = []
    systems = evaluate.baseline_queries(test.turns)
    for name in ("raw", "all_questions"):
      queries = systems[name]
      path = str(tmp_path / f"{len(got)}" / f"{name}.trec")
      evaluate._retrieve_and_write(eval_ranker, queries, path, cfg.retrieval.top_k)
      runs.append(pathlib.Path(path).read_text())
    got.append((ok, ranks, reward, runs))
  ok, ranks, reward, runs = got[0]
  assert ok[:-1].all() and not ok[-1] and (ranks > 0).mean() > 0.5
  for ok2, ranks2, reward2, runs2 in got[1:]:
    np.testing.assert_array_equal(ok2, ok)
    np.testing.assert_array_equal(ranks2, ranks)
    np.testing.assert_array_equal(reward2, reward)
    assert runs2 == runs


def _damaged(root, idx, how):
  bad = str(root / f"bad_{how}")
  if not os.path.exists(bad):
    shutil.copytree(idx, bad)
    if how == "missing":
      shutil.rmtree(os.path.join(bad, "all", "shard-00001"))
    else:
      f = os.path.join(bad, "all", "shard-00000", "rows.npy")
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  return bad


REFUSALS = [
    ("{idx}", ["data.seed=5"], (r"/idx: BM25 index of another corpus \(2010 passages, "
                                r"fingerprint \w+; this run's collection: \d+ passages, "
                                r"fingerprint \w+\)")),
    ("{idx}", ["retrieval.analyzer=whitespace_lower"],
     (r"/idx: BM25 index built with analyzer='lucene_english', this run has "
      r"analyzer='whitespace_lower' \(retrieval.analyzer\)")),
    ("{idx}", ["retrieval.k1=1.2"],
     r"/idx: BM25 index built with k1=0.9, this run has k1=1.2 \(retrieval.k1\)"),
    ("missing", [], r"/bad_missing: all/shard-00001/\w+.npy is missing"),
    ("truncated", [], (r"/bad_truncated: all/shard-00000/rows.npy has \d+ bytes, the "
                       r"manifest says \d+ \(truncated or damaged\)")),
    ("{idx}", ["retrieval.bm25_index=", "retrieval.rank_workers=2"],
     r"retrieval.rank_workers=2 needs retrieval.bm25_index"),
]


@pytest.mark.parametrize("stage", ["grpo", "evaluate"])
@pytest.mark.parametrize("which, sets, message", REFUSALS)
def test_refused_at_stage_start_before_the_model_loads(built, tmp_path, monkeypatch, capsys,
                                                       stage, which, sets, message):
  import re
  root, idx = built
  path = idx if which == "{idx}" else _damaged(root, idx, which)

  def no(*a, **k):
    raise AssertionError("the stage went past its start")
  for name in ("load_policy", "load_stage_policy", "make_mesh", "write_config"):
    monkeypatch.setattr(common, name, no)
  run = str(tmp_path / "run")
  rc = cli.main([stage, "--preset", "tiny", "--run-dir", run, "--set",
                 f"retrieval.bm25_index={path}", *[a for s in sets for a in ("--set", s)]])
  out = capsys.readouterr().err
  err = [x for x in out.splitlines() if x.startswith(f"cqr-jax {stage}: error: ")]
  assert rc == 2 and len(err) == 1 and "Traceback" not in out, out
  assert re.search(message, err[0]), err[0]
  assert not os.path.exists(os.path.join(run, "config.yaml"))


def test_index_check_and_overwrite(built, tmp_path, capsys):
  root, idx = built
  args = ["index", "--preset", "tiny", "--run-dir", str(root / "run")]
  assert cli.main(args + ["--out", idx, "--check"]) == 0
  assert f"{idx}: OK (2010 passages" in capsys.readouterr().out
  copy = str(tmp_path / "idx")
  shutil.copytree(idx, copy)
  assert cli.main(args + ["--out", copy]) == 2
  assert "holds files already: pass --overwrite" in capsys.readouterr().err
  f = pathlib.Path(copy, "all", "vocab.txt")
  f.write_text(f.read_text(encoding="utf-8")[:-2] + "Z\n", encoding="utf-8")  # same size
  assert cli.main(args + ["--out", copy, "--check"]) == 2
  assert "1 file(s) differ from the manifest (all/vocab.txt: size or hash differs)" in (
      capsys.readouterr().err)
  assert cli.main(args + ["--out", copy, "--overwrite"]) == 0
  assert cli.main(args + ["--out", copy, "--check"]) == 0
