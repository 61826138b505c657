"""The MTRAG conversations shipped in the package (`cqr_jax/data/mtrag/README.md`), split in two.

`load_dataset("mtrag", split)` reads both folders over one corpus (the union of their passage
pools, each passage with its domain): `mtrag_un` (507 conversations, scored at their last turn)
and `mtrag_human_subset` (20 conversations flattened into 159 tasks, one record a task, each
scored at its last turn). "mtrag:un" and "mtrag:human" read one folder. Only turns with qrels are
emitted (generic.py).

The split is by conversation (for the human subset the part of conv_id before `<::>`, so all
tasks of a conversation land together), per folder: its conversations with scored turns, ordered
by a SHA-256 of their id, the first TEST_PERCENT % (rounded) go to "test", the rest to "train".
Same files, same split, on every machine; each folder (and so both kinds of conversation) is in
both splits. Turns come in that hash order of their conversations (a conversation's turns together,
in file order), so a cap such as `data.max_train_turns` takes a mix of domains and of both folders.
"""

from __future__ import annotations

import functools
import hashlib
import os

from cqr_jax.data.collection import MemoryCollection
from cqr_jax.data.dataset import Dataset
from cqr_jax.data.generic import read_corpus, read_generic
from cqr_jax.data.types import DataError, Passage

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mtrag")
SUBSETS = {"un": ("mtrag_un",), "human": ("mtrag_human_subset",),
           "all": ("mtrag_un", "mtrag_human_subset")}
SPLITS = ("train", "test", "all")
TEST_PERCENT = 20


def conversation_of(conv_id: str) -> str:
  """The underlying conversation of a record (a human-subset task id is `<conv><::><turn>`)."""
  return conv_id.split("<::>", 1)[0]


def _key(conv: str) -> tuple[str, str]:
  return hashlib.sha256(f"mtrag-split:{conv}".encode()).hexdigest(), conv


def test_conversations(conv_ids) -> set[str]:
  """The underlying conversations of `conv_ids` that form the test split."""
  convs = sorted({conversation_of(c) for c in conv_ids}, key=_key)
  return set(convs[:round(len(convs) * TEST_PERCENT / 100)])


@functools.lru_cache(maxsize=4)
def _read_all(subset: str) -> tuple[Dataset, ...]:
  """Every folder of the subset over one merged collection (cached: splits share it)."""
  passages: dict[str, Passage] = {}
  for folder in SUBSETS[subset]:
    path = os.path.join(ROOT, folder, "corpus.jsonl")
    for p in read_corpus(path, streamed=False):
      if passages.setdefault(p.pid, p) != p:
        raise DataError(f"{path}: passage {p.pid!r} differs from the one in another folder")
  collection = MemoryCollection(list(passages.values()), source=f"mtrag:{subset}")
  return tuple(read_generic(os.path.join(ROOT, folder), None, strict=True, collection=collection)
               for folder in SUBSETS[subset])


def read_mtrag(split: str = "train", subset: str = "all") -> Dataset:
  """One split ("train", "test" or "all") of the packaged MTRAG data (subsets: see SUBSETS)."""
  if subset not in SUBSETS:
    raise DataError(f"unknown MTRAG subset {subset!r}: expected one of {sorted(SUBSETS)}")
  if split not in SPLITS:
    raise DataError(f"MTRAG split must be one of {SPLITS}, got {split!r}")
  parts = _read_all(subset)
  turns, qrels, convs, stats = [], {}, set(), {}
  for folder, ds in zip(SUBSETS[subset], parts):
    test = test_conversations(t.conv_id for t in ds.turns)
    mine = [t for t in ds.turns
            if split == "all" or (conversation_of(t.conv_id) in test) == (split == "test")]
    turns += mine
    qrels.update({t.qid: dict(ds.qrels[t.qid]) for t in mine})
    convs |= {conversation_of(t.conv_id) for t in mine}
    stats[f"turns_{folder}"] = len(mine)
  turns.sort(key=lambda t: _key(conversation_of(t.conv_id)))  # stable: file order within
  stats = dict(conversations=len(convs), turns=len(turns), **stats, test_percent=TEST_PERCENT)
  name = "mtrag" if subset == "all" else f"mtrag:{subset}"
  return Dataset(name=name, split=split, turns=turns, collection=parts[0].collection, qrels=qrels,
                 stats=stats)
