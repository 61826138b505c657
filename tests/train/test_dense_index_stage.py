"""`cqr-jax index --dense` on the tiny preset, then retrieval.dense_index in the stages (issue 33),
on 8 CPU devices: the index's embeddings equal in-memory encoding bit for bit, the corpus is
sharded over the stage's mesh, and the GRPO reward's gold ranks and evaluation's TREC runs equal
the in-memory path's; a mismatched or damaged index is refused at stage start, before any model
loads, with one line naming the file."""

import json
import os
import pathlib
import re
import shutil
import sys

import jax
import numpy as np
import pytest

if __name__ == "__main__":  # a pod worker (see the last test): make the repo importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cqr_jax import config as cfglib
from retrieval import dense_index
from tests.retrieval.test_dense_index import write_tiny_bert
from train import cli, common, evaluate, grpo

OUT = "<think> x </think>\n<rewrite>{}</rewrite>"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("dense_stage")
  model = write_tiny_bert(root / "encoder")
  idx = str(root / "idx")
  rc = cli.main(["index", "--dense", "--preset", "tiny", "--run-dir", str(root / "run"),
                 "--out", idx, "--rows-per-shard", "700", *_dense_sets(model)])
  assert rc == 0 and os.path.exists(os.path.join(idx, "manifest.json"))
  m = dense_index.read_manifest(idx)
  assert [s["rows"] for s in m["shards"]] == [700, 700, 610]
  assert m["build"]["devices"] == 8 and m["build"]["batch_per_device"] == 64
  return root, model, idx


def _dense_sets(model):
  return [a for s in ("retrieval.kind=dense", f"retrieval.dense_model={model}",
                      "retrieval.dense_pooling=mean_norm") for a in ("--set", s)]


def _cfg(root, model, *sets):
  return cfglib.resolve("tiny", None, [f"run_dir={root}/r", "data.max_train_turns=0",
                                       "data.max_test_turns=0", "retrieval.kind=dense",
                                       f"retrieval.dense_model={model}",
                                       "retrieval.dense_pooling=mean_norm", *sets])


def _rollouts(turns):
  class Roll:  # every turn rewritten as its conversation so far, and one unparsable output
    texts = [OUT.format(" ".join([q for q, _ in t.context] + [t.question])) for t in turns]
    texts += ["no tags"]
    prompt_index = np.arange(len(turns) + 1) % len(turns)
  return Roll, np.array([turns[i].qid for i in Roll.prompt_index])


def test_grpo_reward_and_evaluation_runs_equal_in_memory_encoding(built, tmp_path):
  root, model, idx = built
  assert len(jax.devices()) == 8, "tests/conftest.py sets 8 fake CPU devices"
  got = []
  for sets in ((), (f"retrieval.dense_index={idx}",)):
    cfg = _cfg(root, model, *sets)
    common.check_retrieval(cfg, "pipeline")  # what a stage start does
    ds = common.load_split(cfg, cfg.data.train_split)
    turns = ds.turns
    assert len(turns) > 1000
    Roll, qids = _rollouts(turns)
    ranker = common.build_ranker(cfg, ds, cfg.retrieval.reward_max_words)
    s = ranker.searcher
    assert s.mesh.size == 8 and len(s.chunks.sharding.device_set) == 8 and not s.collective
    n = len(ds.collection)
    emb = np.asarray(s.chunks).reshape(-1, s.dim)[:n]  # chunks hold rows in order
    ok, ranks, reward = grpo.score_rollouts(ranker, Roll(), qids, turns, cfg.grpo.reward,
                                            step=1, n_steps=2)
    test = common.load_split(cfg, cfg.data.test_split)
    eval_ranker = common.build_ranker(cfg, test, cfg.retrieval.eval_max_words)
    runs = []
    for name in ("raw", "all_questions"):
      path = str(tmp_path / f"{len(got)}" / f"{name}.trec")
      evaluate._retrieve_and_write(eval_ranker, evaluate.baseline_queries(test.turns)[name],
                                   path, cfg.retrieval.top_k)
      runs.append(pathlib.Path(path).read_text())
    got.append((emb, ok, ranks, reward, runs))
  emb, ok, ranks, reward, runs = got[0]
  assert ok[:-1].all() and not ok[-1] and (ranks > 0).mean() > 0.5
  emb2, ok2, ranks2, reward2, runs2 = got[1]
  np.testing.assert_array_equal(emb2, emb)  # the index's embeddings, bit for bit
  np.testing.assert_array_equal(ok2, ok)
  np.testing.assert_array_equal(ranks2, ranks)
  np.testing.assert_array_equal(reward2, reward)
  assert runs2 == runs


def _variant(root, idx, how):
  """A copy of the index damaged as `how` says."""
  bad = str(root / f"bad_{how}")
  if not os.path.exists(bad):
    shutil.copytree(idx, bad)
    f = os.path.join(bad, "emb-00001.npy")
    if how == "missing":
      os.remove(f)
    elif how == "truncated":
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    elif how == "unfinished":
      os.remove(os.path.join(bad, "manifest.json"))
  return bad


REFUSALS = [
    ("idx", ["data.seed=5"], (r"/idx/manifest.json: dense index of another corpus \(2010 "
                              r"passages, fingerprint \w+; this run's collection: \d+ passages")),
    ("idx", ["retrieval.dense_pooling=mean"],
     (r"/idx/manifest.json: dense index encoded with pooling='mean_norm' \(.*\), this run has "
      r"pooling='mean' \(.*retrieval.dense_pooling\)")),
    ("other", [], (r"/idx/manifest.json: dense index encoded with model_blake2b='\w+' \(.*/encoder"
                   r"\), this run has model_blake2b='\w+' \(.*/other; retrieval.dense_model\)")),
    ("missing", [], r"/bad_missing/emb-00001.npy: shard missing"),
    ("truncated", [], (r"/bad_truncated/emb-00001.npy: \d+ bytes, the manifest says \d+ "
                       r"\(truncated or damaged\)")),
    ("unfinished", [], r"/bad_unfinished: no dense index here \(manifest.json missing"),
]


@pytest.mark.parametrize("stage", ["grpo", "evaluate"])
@pytest.mark.parametrize("which, sets, message", REFUSALS)
def test_refused_at_stage_start_before_the_model_loads(built, tmp_path, monkeypatch, capsys,
                                                       stage, which, sets, message):
  root, model, idx = built
  path = idx if which in ("idx", "other") else _variant(root, idx, which)
  if which == "other":
    model = str(root / "other")
    if not os.path.exists(model):
      write_tiny_bert(model, seed=1)

  def no(*a, **k):
    raise AssertionError("the stage went past its start")
  for name in ("load_policy", "load_stage_policy", "make_mesh", "write_config"):
    monkeypatch.setattr(common, name, no)
  run = str(tmp_path / "run")
  rc = cli.main([stage, "--preset", "tiny", "--run-dir", run, *_dense_sets(model), "--set",
                 f"retrieval.dense_index={path}", *[a for s in sets for a in ("--set", s)]])
  out = capsys.readouterr().err
  err = [x for x in out.splitlines() if x.startswith(f"cqr-jax {stage}: error: ")]
  assert rc == 2 and len(err) == 1 and "Traceback" not in out, out
  assert re.search(message, err[0]), err[0]
  assert not os.path.exists(os.path.join(run, "config.yaml"))


def test_index_check_overwrite_and_resume(built, tmp_path, capsys):
  root, model, idx = built
  args = ["index", "--dense", "--preset", "tiny", "--run-dir", str(root / "run"),
          "--rows-per-shard", "700", *_dense_sets(model)]
  assert cli.main(args + ["--out", idx, "--check"]) == 0
  assert f"{idx}: OK (2010 passages, 3 shards" in capsys.readouterr().out
  copy = str(tmp_path / "idx")
  shutil.copytree(idx, copy)
  assert cli.main(args + ["--out", copy]) == 2
  assert "holds an index already: pass --overwrite" in capsys.readouterr().err
  f = pathlib.Path(copy, "emb-00002.npy")
  data = f.read_bytes()
  f.write_bytes(data[:-4] + bytes(4))  # same size, other bytes
  assert cli.main(args + ["--out", copy, "--check"]) == 2
  assert "1 shard(s) differ from the manifest (emb-00002.npy: size or hash differs)" in (
      capsys.readouterr().err)
  os.remove(os.path.join(copy, "manifest.json"))  # an interrupted build: resumed
  os.remove(f)
  assert cli.main(args + ["--out", copy]) == 0
  assert "3 shards, 2 reused" in capsys.readouterr().out
  assert cli.main(args + ["--out", copy, "--check"]) == 0
  assert pathlib.Path(copy, "emb-00002.npy").read_bytes() == data


def _pod_worker(root, model, idx, out):
  """One process of a 2-process pod (4 CPU devices each): builds the index with the encoder
  batch split over all 8 devices, then ranks the GRPO rollouts and retrieves evaluation's raw
  queries over the pod's mesh from the parent's index, every process passing every query."""
  from cqr_jax import distributed
  distributed.initialize()
  pid = jax.process_index()
  assert jax.process_count() == 2 and len(jax.devices()) == 8
  rc = cli.main(["index", "--dense", "--preset", "tiny", "--run-dir", f"{out}/run{pid}",
                 "--out", f"{out}/idx", "--rows-per-shard", "700", *_dense_sets(model)])
  assert rc == 0
  cfg = _cfg(root, model, f"retrieval.dense_index={idx}")
  common.check_retrieval(cfg, "grpo")
  ds = common.load_split(cfg, cfg.data.train_split)
  Roll, qids = _rollouts(ds.turns)
  ranker = common.build_ranker(cfg, ds, cfg.retrieval.reward_max_words)
  assert ranker.searcher.collective and ranker.searcher.mesh.size == 8
  ranks = grpo.host_ranks(ranker, np.array(Roll.texts[:-1], object), qids[:-1])
  test = common.load_split(cfg, cfg.data.test_split)
  queries = evaluate.baseline_queries(test.turns)["raw"]
  ranked = common.build_ranker(cfg, test, cfg.retrieval.eval_max_words).search_ranked(
      list(queries.values()), 100, qids=list(queries))
  with open(os.path.join(out, f"got{pid}.json"), "w") as f:
    json.dump({"ranks": ranks.tolist(), "ranked": ranked}, f)


@pytest.mark.slow
def test_two_processes_build_and_search_like_one(built, tmp_path):
  """The index built by a 2-process pod equals the 1-process one file for file, and the pod's
  gold ranks and ranked lists over the mesh that spans both equal one process's."""
  from tests.multiprocess import run_processes
  root, model, idx = built
  run_processes([sys.executable, os.path.abspath(__file__), str(root), model, idx,
                 str(tmp_path)], num_processes=2, local_devices=4, timeout_s=600)
  one, pod = dense_index.read_manifest(idx), dense_index.read_manifest(str(tmp_path / "idx"))
  assert pod["build"]["processes"] == 2 and pod["build"]["devices"] == 8
  assert [s["blake2b"] for s in pod["shards"]] == [s["blake2b"] for s in one["shards"]]
  cfg = _cfg(root, model, f"retrieval.dense_index={idx}")
  ds = common.load_split(cfg, cfg.data.train_split)
  Roll, qids = _rollouts(ds.turns)
  ranks = common.build_ranker(cfg, ds, cfg.retrieval.reward_max_words).ranks(Roll.texts[:-1],
                                                                             qids[:-1])
  test = common.load_split(cfg, cfg.data.test_split)
  queries = evaluate.baseline_queries(test.turns)["raw"]
  ranked = common.build_ranker(cfg, test, cfg.retrieval.eval_max_words).search_ranked(
      list(queries.values()), 100, qids=list(queries))
  for pid in (0, 1):
    got = json.loads((tmp_path / f"got{pid}.json").read_text())
    assert got["ranks"] == ranks.tolist() and got["ranked"] == ranked


if __name__ == "__main__":
  _pod_worker(*sys.argv[1:])
