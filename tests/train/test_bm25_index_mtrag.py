"""`cqr-jax index` on MTRAG with retrieval.within_domain (one index part per domain): gold ranks
and ranked lists from the loaded index, in-process and with two rank workers, equal the
in-memory per-domain indexes', for lucene and okapi (issue 33)."""

import json
import pathlib

import numpy as np
import pytest

from cqr_jax import config as cfglib
from train import cli, common


@pytest.fixture(autouse=True)
def _stop_workers():
  yield
  common.close_rank_pools()


@pytest.mark.parametrize("kind", ["lucene", "okapi"])
def test_mtrag_within_domain_ranks_equal(tmp_path, kind):
  idx = str(tmp_path / "idx")
  sets = ["--set", f"retrieval.bm25={kind}"]
  assert cli.main(["index", "--preset", "cpu-mtrag", "--run-dir", str(tmp_path / "run"),
                   "--out", idx, "--max-postings-in-memory", "20000", *sets]) == 0
  m = json.loads(pathlib.Path(idx, "manifest.json").read_text())
  assert sorted(p["domain"] for p in m["parts"]) == ["clapnq", "cloud", "fiqa", "govt"]
  assert m["kind"] == kind
  got = []
  for extra in ([], [f"retrieval.bm25_index={idx}"],
                [f"retrieval.bm25_index={idx}", "retrieval.rank_workers=2"]):
    cfg = cfglib.resolve("cpu-mtrag", None, [f"run_dir={tmp_path}/r", f"retrieval.bm25={kind}",
                                             "data.max_train_turns=0", *extra])
    common.check_retrieval(cfg, "pipeline")
    out = []
    for split in (cfg.data.train_split, cfg.data.test_split):
      ds = common.load_split(cfg, split)
      ranker = common.build_ranker(cfg, ds, cfg.retrieval.reward_max_words)
      assert sorted(ranker.searchers) == ["clapnq", "cloud", "fiqa", "govt"]
      qids = [t.qid for t in ds.turns]
      texts = [" ".join([q for q, _ in t.context][-2:] + [t.question]) for t in ds.turns]
      out.append((ranker.ranks(texts, qids), ranker.search_ranked(texts, qids=qids)))
    got.append(out)
  for ranks, lists in got[0]:
    assert (ranks > 0).mean() > 0.3 and all(lists)
  for other in got[1:]:
    for (ranks, lists), (ranks2, lists2) in zip(got[0], other):
      np.testing.assert_array_equal(ranks2, ranks)
      assert lists2 == lists
