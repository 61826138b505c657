"""The MTRAG conversations shipped in the package: files, split by conversation, qrels, domains."""

import os

import pytest

from cqr_jax.data import load_dataset
from cqr_jax.data import mtrag_reader as M
from cqr_jax.data.generic import read_conversations
from cqr_jax.data.types import DataError

DOMAINS = {"govt", "clapnq", "cloud", "fiqa"}


def test_files_are_in_the_package():
  for f in ("README.md", "LICENSE.txt"):
    assert os.path.isfile(os.path.join(M.ROOT, f))
  for folder in ("mtrag_un", "mtrag_human_subset"):
    for f in ("conversations.jsonl", "corpus.jsonl", "qrels.tsv"):
      assert os.path.isfile(os.path.join(M.ROOT, folder, f))


def test_split_is_by_conversation_and_complete():
  train, test, every = (load_dataset("mtrag", s) for s in ("train", "test", "all"))
  assert (len(train), len(test), len(every)) == (387, 95, 482)
  assert (train.stats["conversations"], test.stats["conversations"]) == (282, 70)
  conv = lambda ds: {M.conversation_of(t.conv_id) for t in ds.turns}  # noqa: E731
  assert not conv(train) & conv(test)
  assert sorted(t.qid for t in train.turns + test.turns) == sorted(t.qid for t in every.turns)
  # Both folders reach both splits; each human conversation's tasks stay together.
  for ds in (train, test):
    assert ds.stats["turns_mtrag_un"] and ds.stats["turns_mtrag_human_subset"]
    assert {t.domain for t in ds.turns} == DOMAINS
  assert len({M.conversation_of(t.conv_id) for t in test.turns if "<::>" in t.conv_id}) == 4
  assert train.collection is test.collection and len(train.collection) == 1488


def test_split_is_deterministic():
  M._read_all.cache_clear()
  a = load_dataset("mtrag", "test")
  M._read_all.cache_clear()
  b = load_dataset("mtrag", "test")
  assert a.turns == b.turns and a.qrels == b.qrels
  ids = [c["conv_id"] for _, c in read_conversations(
      os.path.join(M.ROOT, "mtrag_un", "conversations.jsonl"))]
  assert M.test_conversations(ids) == M.test_conversations(reversed(ids))


def test_every_turn_has_qrels_in_its_domain():
  for split in ("train", "test"):
    ds = load_dataset("mtrag", split)
    domain = {p.pid: p.domain for p in ds.collection}
    assert set(ds.qrels) == {t.qid for t in ds.turns}
    for t in ds.turns:
      assert t.gold_ids and set(t.gold_ids) == set(ds.qrels[t.qid])
      assert {domain[p] for p in t.gold_ids} == {t.domain}
      assert t.context or t.turn_id == 1


def test_one_folder_and_bad_names():
  un, human = load_dataset("mtrag:un", "all"), load_dataset("mtrag:human", "all")
  assert (len(un), len(un.collection), len(human), len(human.collection)) == (332, 1152, 150, 350)
  with pytest.raises(DataError, match="split must be one of"):
    load_dataset("mtrag", "dev")
  with pytest.raises(DataError, match="unknown MTRAG subset"):
    load_dataset("mtrag:nope", "train")
