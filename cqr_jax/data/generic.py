"""Generic conversational search folders (the layout of ../shared/data/mtrag/README.md).

Files: `conversations.jsonl` (one conversation a line: conv_id, optional domain, turns with turn_id,
qid (null = not scored), question, optional answer, optional `rewrite*` fields), `corpus.jsonl`
(id, optional title, text) and `qrels.tsv` (qid, 0, passage id, relevance; TAB-separated, or
whitespace when a line has no TAB). A folder may hold one split at its root, or per-split
subfolders `<split>/conversations.jsonl` and `<split>/qrels.tsv` sharing the root's corpus.

Context = every previous turn of the conversation, scored or not; a turn with an absent or empty
answer appears as its question alone. A turn is emitted when it has a qid with at least one
relevant (grade >= 1) passage in the collection.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cqr_jax.data import trec
from cqr_jax.data.collection import FileCollection, MemoryCollection, default_index_dir
from cqr_jax.data.dataset import Dataset, GoldChecker, check_question
from cqr_jax.data.types import Collection, DataError, Passage, Turn

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
      passages.append(Passage(str(obj["id"]), str(obj["text"]), str(obj.get("title") or "")))
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
      prev = None
      for i, t in enumerate(conv["turns"]):
        where = f"{path}:{lineno}: conversation {cid!r} turn #{i + 1}"
        if not isinstance(t, dict) or "turn_id" not in t:
          raise DataError(f"{where}: a turn needs 'turn_id'")
        try:
          tid = int(t["turn_id"])
        except (TypeError, ValueError):
          raise DataError(f"{where}: turn_id must be an integer, got {t['turn_id']!r}") from None
        if prev is not None and tid <= prev:
          raise DataError(f"{where}: turn_id {tid} out of order (after {prev})")
        prev = tid
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
                               turns_unjudged=0, turns_no_gold_in_collection=0)
  turns: list[Turn] = []
  qrels: dict[str, dict[str, int]] = {}
  seen_qids: set[str] = set()
  for lineno, conv in read_conversations(conv_path):
    stats["conversations"] += 1
    cid = str(conv["conv_id"])
    context: list[tuple[str, str | None]] = []
    for t in conv["turns"]:
      stats["turns_read"] += 1
      question = t["question"]
      answer = t.get("answer")
      answer = answer if isinstance(answer, str) and answer.strip() else None
      qid = t.get("qid")
      if qid is None:
        stats["turns_not_scored"] += 1
      else:
        qid = str(qid)
        where = f"{conv_path}:{lineno}: qid {qid!r}"
        if qid in seen_qids:
          raise DataError(f"{where}: duplicate qid")
        seen_qids.add(qid)
        judged = {p: g for p, g in qrels_all.get(qid, {}).items() if g >= 1}
        present = {p: g for p, g in judged.items() if gold.present(p, f"{qrels_path}: {qid}")}
        if not judged and not keep_unjudged:
          stats["turns_unjudged"] += 1
        elif judged and not present:
          stats["turns_no_gold_in_collection"] += 1
        else:
          turns.append(Turn(conv_id=cid, turn_id=int(t["turn_id"]), qid=qid, question=question,
                            context=tuple(context), gold_ids=tuple(present),
                            rewrites=rewrite_fields(t), domain=t.get("domain", conv.get("domain"))))
          if present:
            qrels[qid] = present
      context.append((question, answer))
  stats["turns_emitted"] = len(turns)
  gold.report(stats)
  name = os.path.basename(os.path.normpath(root))
  return Dataset(name=name, split=split or "all", turns=turns, collection=collection,
                 qrels=qrels, stats=stats)
