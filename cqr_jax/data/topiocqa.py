"""TopiOCQA from its released files (method.md 1.2).

Files under the given folder (first match wins), flat or in the layout the download script
(TopiOCQA's download_data.py, run by the official preprocess/topiocqa/download.sh) writes,
`downloads/data/{topiocqa_dataset,retriever/all_history,wikipedia_split}/`; the folder may be the
download folder, its `downloads/` or its `downloads/data/`:
- turns: `topiocqa_{train,dev}.json`, `topiocqa_dataset/{train,dev}.json` or
  `topiocqa_dataset/topiocqa_{train,dev}.json` (a JSON list of
  turns: Conversation_no, Turn_no, Question, Context = flat [q1, a1, q2, a2, ...], Topic,
  Topic_section, Answer, ...),
- golds: `all_history/{train,dev}.json` or `retriever/all_history/{train,dev}.json` (DPR format,
  aligned 1:1 with the turns: conv_id, turn_id, positive_ctxs = [{title, text, passage_id}, ...]),
- collection: `full_wiki_segments.tsv` or `wikipedia_split/full_wiki_segments.tsv` (id, text,
  title; header row; title " [SEP] " -> " "); indexed on disk (25.7M rows).
Query ids `topiocqa-{train,dev}_{conv}_{turn}`; qrels hold only positive_ctxs[0] (one gold).
"""

from __future__ import annotations

import json
import os
from typing import Any

from cqr_jax.data.collection import FileCollection, default_index_dir
from cqr_jax.data.dataset import Dataset, GoldChecker, check_question
from cqr_jax.data.types import Collection, DataError, Turn

SPLIT_FILES = {"train": "train", "dev": "dev", "test": "dev"}
# Where the download script's `downloads/data/` may sit relative to the folder given.
_PREFIXES = ("", "data/", "downloads/data/")


def _first(root: str, rels: list[str], what: str) -> str:
  rels = [pre + r for r in rels for pre in _PREFIXES]
  for r in rels:
    p = os.path.join(root, r)
    if os.path.isfile(p):
      return p
  raise DataError(f"{root}: TopiOCQA {what} not found (looked for {', '.join(rels)})")


def _load_json_list(path: str) -> list:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
  return data


def open_collection(root: str, index_dir: str | None = None, progress: bool = True) -> Collection:
  path = _first(root, ["full_wiki_segments.tsv", "wikipedia_split/full_wiki_segments.tsv"],
                "collection")
  return FileCollection([path], "topiocqa_tsv", index_dir or default_index_dir(path),
                        skip_header=True, progress=progress)


def read_topiocqa(root: str | os.PathLike, split: str = "train", strict: bool = False,
                  progress: bool = True, index_dir: str | None = None,
                  collection: Collection | None = None) -> Dataset:
  """Reads one split ("train", or "dev" = "test")."""
  root = os.fspath(root)
  if split not in SPLIT_FILES:
    raise ValueError(f"TopiOCQA split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
  s = SPLIT_FILES[split]
  turns_path = _first(root, [f"topiocqa_{s}.json", f"topiocqa_dataset/{s}.json",
                             f"topiocqa_dataset/topiocqa_{s}.json"], f"{s} turns")
  gold_path = _first(root, [f"all_history/{s}.json", f"retriever/all_history/{s}.json"],
                     f"{s} gold file")
  if collection is None:
    collection = open_collection(root, index_dir, progress)
  records, golds = _load_json_list(turns_path), _load_json_list(gold_path)
  if len(records) != len(golds):
    raise DataError(f"{gold_path}: {len(golds)} records but {turns_path} has {len(records)} turns "
                    "(the files must be aligned 1:1)")
  checker = GoldChecker(collection, strict)
  stats: dict[str, Any] = dict(turns_read=len(records), turns_no_gold=0,
                               turns_no_gold_in_collection=0)
  turns: list[Turn] = []
  qrels: dict[str, dict[str, int]] = {}
  last_turn: dict[str, int] = {}
  for i, (r, g) in enumerate(zip(records, golds)):
    where = f"{turns_path}: record {i}"
    try:
      conv, turn = str(r["Conversation_no"]), int(r["Turn_no"])
      question, context = r["Question"], r["Context"]
    except (KeyError, TypeError, ValueError) as e:
      raise DataError(f"{where}: missing or bad field {e}") from None
    where = f"{turns_path}: record {i} (conversation {conv}, turn {turn})"
    if (str(g.get("conv_id")), str(g.get("turn_id"))) != (conv, str(turn)):
      raise DataError(f"{gold_path}: record {i} is conv {g.get('conv_id')} turn {g.get('turn_id')} "
                      f"but {turns_path} record {i} is conv {conv} turn {turn} (not aligned)")
    if conv in last_turn and turn != last_turn[conv] + 1:
      raise DataError(f"{where}: turn numbers out of order (turn {turn} after {last_turn[conv]})")
    last_turn[conv] = turn
    check_question(question, where)
    if not isinstance(context, list) or len(context) % 2:
      got = len(context) if isinstance(context, list) else type(context).__name__
      raise DataError(f"{where}: Context must be a list of alternating questions and answers, "
                      f"got {got}")
    positives = g.get("positive_ctxs") or []
    if not positives:
      stats["turns_no_gold"] += 1
      continue
    pid = str(positives[0]["passage_id"])
    if not checker.present(pid, f"{gold_path}: record {i}"):
      stats["turns_no_gold_in_collection"] += 1
      continue
    qid = f"topiocqa-{s}_{conv}_{turn}"
    pairs = tuple((str(context[j]), str(context[j + 1])) for j in range(0, len(context), 2))
    turns.append(Turn(conv_id=conv, turn_id=turn, qid=qid, question=question, context=pairs,
                      gold_ids=(pid,)))
    qrels[qid] = {pid: 1}
  stats["turns_emitted"] = len(turns)
  checker.report(stats)
  return Dataset(name=f"topiocqa:{root}", split=s, turns=turns, collection=collection,
                 qrels=qrels, stats=stats)
