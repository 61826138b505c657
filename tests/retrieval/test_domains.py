"""Retrieval within each turn's domain (retrieval.within_domain) through train/common's ranker."""

import dataclasses

import numpy as np
import pytest

from cqr_jax import config as cfglib
from cqr_jax.data import Dataset, MemoryCollection, load_dataset
from retrieval.domains import TurnRanker, rows_by_domain
from train import common


def _cfg(within: bool):
  return cfglib.configlib.merge(cfglib.resolve("cpu-mtrag"),
                                {"retrieval": {"within_domain": within}})


def _queries(ds):
  return [" ".join([q for q, _ in t.context] + [t.question]) for t in ds.turns]


def test_never_returns_another_domain():
  ds = load_dataset("mtrag", "test")
  ranker = common.build_ranker(_cfg(True), ds, 512)
  assert isinstance(ranker, TurnRanker) and sorted(ranker.searchers) == sorted(
      {"govt", "clapnq", "cloud", "fiqa"})
  domain = {p.pid: p.domain for p in ds.collection}
  qids = [t.qid for t in ds.turns]
  ranked = ranker.search_ranked(_queries(ds), qids=qids)
  for t, pids in zip(ds.turns, ranked):
    assert pids and {domain[p] for p in pids} == {t.domain}
  # ranks() finds the domains from the qids alone, as the reward and the SDPW filter call it.
  want = [next((i + 1 for i, p in enumerate(r) if p in ds.qrels[t.qid]), -1)
          for t, r in zip(ds.turns, ranked)]
  assert ranker.ranks(_queries(ds), qids).tolist() == want
  plain = common.build_ranker(_cfg(False), ds, 512)
  assert plain.searchers is None
  assert any({domain[p] for p in r} != {t.domain}
             for t, r in zip(ds.turns, plain.search_ranked(_queries(ds))))
  with pytest.raises(ValueError, match="domains="):
    ranker.search_ranked(_queries(ds))  # neither qids nor domains: refuse rather than mix


def test_one_domain_equals_plain_retrieval():
  full = load_dataset("mtrag", "train")
  turns = [t for t in full.turns if t.domain == "govt"]
  passages = [p for p in full.collection if p.domain == "govt"]
  ds = Dataset("govt", "train", turns, MemoryCollection(passages),
               {t.qid: full.qrels[t.qid] for t in turns})
  bare = dataclasses.replace(ds, collection=MemoryCollection(
      [dataclasses.replace(p, domain=None) for p in passages]))
  routed = common.build_ranker(_cfg(True), ds, 512)
  assert list(routed.searchers) == ["govt"]
  qids = [t.qid for t in turns]
  for plain in (common.build_ranker(_cfg(False), ds, 512),
                common.build_ranker(_cfg(True), bare, 512)):
    assert plain.searchers is None
    assert routed.search_ranked(_queries(ds), qids=qids) == plain.search_ranked(_queries(ds))
    np.testing.assert_array_equal(routed.ranks(_queries(ds), qids),
                                  plain.ranks(_queries(ds), qids))


def test_domain_checks():
  assert rows_by_domain([None, None], ["a", "b"]) is None
  got = rows_by_domain(["y", "x", "y"], ["a", "b", "c"])
  assert list(got) == ["x", "y"] and got["y"].tolist() == [0, 2]
  with pytest.raises(ValueError, match="1 passages have no domain"):
    rows_by_domain(["x", None], ["a", "b"])
  ds = load_dataset("mtrag", "test")
  bad = dataclasses.replace(ds, turns=[dataclasses.replace(ds.turns[0], domain=None)])
  with pytest.raises(ValueError, match="within_domain=false"):
    common.build_ranker(_cfg(True), bad, 512)
