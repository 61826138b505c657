"""Writes loaded splits in the generic layout (generic.py), so that `read_generic` reads them back.

`corpus.jsonl` at the root (the splits' shared collection), `<split>/conversations.jsonl` and
`<split>/qrels.tsv`. A conversation is rebuilt from its scored turns: the longest one's context
plus its question, each scored turn placed at its position (its context length); turn ids become
positions 1..n. A scored turn whose context is not a prefix of that path gets a record of its own.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from cqr_jax.data.dataset import Dataset
from cqr_jax.data.types import DataError, Turn


def _dump(obj) -> str:
  return json.dumps(obj, ensure_ascii=False) + "\n"


def _turn_record(i: int, question: str, answer: str | None, scored: Turn | None) -> dict:
  rec: dict = {"turn_id": i + 1, "qid": scored.qid if scored else None, "question": question}
  if answer is not None:
    rec["answer"] = answer
  for name, text in (scored.rewrites if scored else {}).items():
    rec["rewrite" if name == "rewrite" else f"rewrite_{name}"] = text
  return rec


def _records(cid: str, turns: list[Turn]) -> list[dict]:
  """Conversation records for the scored turns of one conversation id."""
  last = max(turns, key=lambda t: len(t.context))
  path = list(last.context) + [(last.question, None)]
  at, own = {}, []
  for t in turns:
    n = len(t.context)
    if list(t.context) == path[:n] and path[n][0] == t.question and n not in at:
      at[n] = t
    else:
      own.append(t)
  out = [_conv(cid, last.domain, path, at)]
  for t in own:
    out.append(_conv(f"{cid}<::>{t.qid}", t.domain, list(t.context) + [(t.question, None)],
                     {len(t.context): t}))
  return out


def _conv(cid: str, domain: str | None, path: list, scored: dict[int, Turn]) -> dict:
  rec: dict = {"conv_id": cid}
  if domain is not None:
    rec["domain"] = domain
  rec["turns"] = [_turn_record(i, q, a, scored.get(i)) for i, (q, a) in enumerate(path)]
  return rec


def write_generic(out_dir: str | os.PathLike, splits: Mapping[str, Dataset]) -> str:
  """Writes {split name: Dataset} (one shared collection) under out_dir; returns out_dir."""
  out_dir = os.fspath(out_dir)
  if not splits:
    raise ValueError("write_generic: no splits to write")
  collection = next(iter(splits.values())).collection
  for name, ds in splits.items():
    if len(ds.collection) != len(collection):
      raise DataError(f"write_generic: split {name!r} has another collection "
                      f"({len(ds.collection)} passages, not {len(collection)})")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "corpus.jsonl"), "w", encoding="utf-8", newline="\n") as f:
    for p in collection:
      rec = {"id": p.pid, "text": p.text}
      rec.update({k: v for k, v in (("title", p.title), ("domain", p.domain)) if v})
      f.write(_dump(rec))
  for name, ds in splits.items():
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    by_conv: dict[str, list[Turn]] = {}
    for t in ds.turns:
      by_conv.setdefault(t.conv_id, []).append(t)
    with open(os.path.join(d, "conversations.jsonl"), "w", encoding="utf-8", newline="\n") as f:
      for cid, turns in by_conv.items():
        f.writelines(_dump(r) for r in _records(cid, turns))
    with open(os.path.join(d, "qrels.tsv"), "w", encoding="utf-8", newline="\n") as f:
      for t in ds.turns:
        for pid, grade in ds.qrels.get(t.qid, {}).items():
          f.write(f"{t.qid}\t0\t{pid}\t{grade}\n")
  return out_dir
