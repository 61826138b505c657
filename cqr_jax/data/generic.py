"""Generic conversational search folders (the layout of ../shared/data/mtrag/README.md).

Files: `conversations.jsonl` (one conversation a line: conv_id, optional domain, turns with turn_id,
qid (null = not scored), question, optional answer, optional `rewrite*` fields), `corpus.jsonl`
(id, optional title, text, optional domain) and `qrels.tsv` (qid, 0, passage id, relevance;
TAB-separated, or whitespace when a line has no TAB). A folder may hold one split at its root, or
per-split subfolders `<split>/conversations.jsonl` and `<split>/qrels.tsv` sharing the root's
corpus.

Context = every previous turn of the conversation, scored or not; a turn with an absent or empty
answer appears as its question alone. A turn is emitted when it has a qid with at least one
relevant (grade >= 1) passage in the collection.

Turn ids are integers (increasing within a conversation) or strings such as "1-1" or "3_2" (taken
in file order). A conversation flattened into several paths (a topic tree) repeats its shared
turns, qids included, in each path: a qid repeated with the same question is scored once (its
first occurrence) and stays in every path's context; with a different question it is an error.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from cqr_jax.data import trec
from cqr_jax.data.collection import FileCollection, MemoryCollection, default_index_dir
from cqr_jax.data.dataset import Dataset, GoldChecker, check_question
from cqr_jax.data.types import Collection, DataError, Passage, Turn, turn_id_value

log = logging.getLogger("cqr_jax")

STREAM_ABOVE_BYTES = 256 << 20  # corpus files larger than this are indexed on disk, not loaded


def _find(root: str, split: str | None, name: str) -> str | None:
  cands = ([os.path.join(root, split, name)] if split else []) + [os.path.join(root, name)]
  return next((c for c in cands if os.path.isfile(c)), None)


def read_corpus(path: str, streamed: bool | None = None, index_dir: str | None = None,
                progress: bool = True) -> Collection:
  """`corpus.jsonl` into a collection (in memory when small, else an on-disk index)."""
  if streamed is None:
    streamed = os.path.getsize(path) > STREAM_ABOVE_BYTES
  if streamed:
    return FileCollection([path], "jsonl", index_dir or default_index_dir(path), progress=progress)
  passages = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
      if not isinstance(obj, dict) or "id" not in obj or obj.get("text") is None:
        raise DataError(f"{path}:{lineno}: a corpus line needs 'id' and 'text'")
      domain = obj.get("domain")
      passages.append(Passage(str(obj["id"]), str(obj["text"]), str(obj.get("title") or ""),
                              None if domain is None else str(domain)))
  if not passages:
    raise DataError(f"{path}: corpus is empty")
  return MemoryCollection(passages, source=path)


def rewrite_fields(turn: dict) -> dict[str, str]:
  """`rewrite_<name>` -> name (`rewrite` alone -> "rewrite"); empty values skipped."""
  out = {}
  for k, v in turn.items():
    if k.startswith("rewrite") and isinstance(v, str) and v.strip():
      out[k[len("rewrite_"):] if k.startswith("rewrite_") else k] = v
  return out


def read_conversations(path: str) -> list[tuple[int, dict]]:
  """Parses and validates conversations.jsonl; returns (line number, conversation) pairs."""
  convs, seen = [], {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        conv = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
      if (not isinstance(conv, dict) or "conv_id" not in conv
          or not isinstance(conv.get("turns"), list)):
        raise DataError(f"{path}:{lineno}: a conversation needs 'conv_id' and a list 'turns'")
      cid = str(conv["conv_id"])
      if cid in seen:
        raise DataError(f"{path}:{lineno}: duplicate conv_id {cid!r} (first on line {seen[cid]})")
      seen[cid] = lineno
      prev, ids = None, set()
      for i, t in enumerate(conv["turns"]):
        where = f"{path}:{lineno}: conversation {cid!r} turn #{i + 1}"
        if not isinstance(t, dict) or "turn_id" not in t:
          raise DataError(f"{where}: a turn needs 'turn_id'")
        try:
          tid = turn_id_value(t["turn_id"])
        except ValueError as e:
          raise DataError(f"{where}: {e}") from None
        if isinstance(tid, int):  # integer ids must increase; string ids keep file order
          if prev is not None and tid <= prev:
            raise DataError(f"{where}: turn_id {tid} out of order (after {prev})")
          prev = tid
        elif tid in ids:
          raise DataError(f"{where}: duplicate turn_id {tid!r}")
        ids.add(tid)
        check_question(t.get("question"), where)
      convs.append((lineno, conv))
  return convs


def read_generic(root: str | os.PathLike, split: str | None = "train", strict: bool = False,
                 progress: bool = True, streamed: bool | None = None,
                 index_dir: str | None = None, keep_unjudged: bool = False,
                 collection: Collection | None = None) -> Dataset:
  """Reads a generic folder (module docstring); keep_unjudged emits scored turns without qrels."""
  root = os.fspath(root)
  conv_path = _find(root, split, "conversations.jsonl")
  qrels_path = _find(root, split, "qrels.tsv")
  corpus_path = _find(root, None, "corpus.jsonl") or _find(root, split, "corpus.jsonl")
  for what, p in (("conversations.jsonl", conv_path), ("qrels.tsv", qrels_path),
                  ("corpus.jsonl", corpus_path)):
    if p is None:
      raise DataError(f"{root}: no {what} (looked in {root}"
                      + (f" and {os.path.join(root, split)})" if split else ")"))
  if collection is None:
    collection = read_corpus(corpus_path, streamed, index_dir, progress)
  qrels_all = trec.read_qrels(qrels_path)
  gold = GoldChecker(collection, strict)
  stats: dict[str, Any] = dict(conversations=0, turns_read=0, turns_not_scored=0,
                               turns_unjudged=0, turns_no_gold_in_collection=0, turns_repeated=0)
  turns: list[Turn] = []
  qrels: dict[str, dict[str, int]] = {}
  first: dict[str, tuple[str, int]] = {}  # qid -> (question, line) of its first occurrence
  repeated: set[str] = set()
  for lineno, conv in read_conversations(conv_path):
    stats["conversations"] += 1
    cid = str(conv["conv_id"])
    context: list[tuple[str, str | None]] = []
    for t in conv["turns"]:
      stats["turns_read"] += 1
      question = t["question"]
      answer = t.get("answer")
      answer = answer if isinstance(answer, str) and answer.strip() else None
      qid = None if t.get("qid") is None else str(t["qid"])
      if qid is None:
        stats["turns_not_scored"] += 1
      elif qid in first:  # a turn shared by several paths of one conversation: scored once
        q0, line0 = first[qid]
        if q0.strip() != question.strip():
          raise DataError(f"{conv_path}:{lineno}: qid {qid!r} repeats line {line0}'s qid with a "
                          f"different question ({question!r}, was {q0!r})")
        repeated.add(qid)
        stats["turns_repeated"] += 1
      else:
        first[qid] = (question, lineno)
        judged = {p: g for p, g in qrels_all.get(qid, {}).items() if g >= 1}
        present = {p: g for p, g in judged.items() if gold.present(p, f"{qrels_path}: {qid}")}
        if not judged and not keep_unjudged:
          stats["turns_unjudged"] += 1
        elif judged and not present:
          stats["turns_no_gold_in_collection"] += 1
        else:
          turns.append(Turn(conv_id=cid, turn_id=turn_id_value(t["turn_id"]), qid=qid,
                            question=question, context=tuple(context), gold_ids=tuple(present),
                            rewrites=rewrite_fields(t), domain=t.get("domain", conv.get("domain"))))
          if present:
            qrels[qid] = present
      context.append((question, answer))
  stats["turns_emitted"] = len(turns)
  stats["qids_repeated"] = len(repeated)
  if repeated:
    log.info("%s: %d qids appear in several conversations (%d repeated turns, e.g. %r): each is "
             "scored once and kept in every conversation's context", conv_path, len(repeated),
             stats["turns_repeated"], min(repeated))
  gold.report(stats)
  name = os.path.basename(os.path.normpath(root))
  return Dataset(name=name, split=split or "all", turns=turns, collection=collection,
                 qrels=qrels, stats=stats)
