"""The nouns every reader yields and every stage consumes (design.md "The nouns").

`Turn` is one scored user turn with its conversational context; `Qrels` maps a query id to its
judged passages; a collection maps passage ids to title/text (see `collection.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Protocol, Sequence

# qid -> {passage id: relevance grade}. Grade >= 1 counts as relevant (method.md 5.4).
Qrels = dict[str, dict[str, int]]


@dataclasses.dataclass(frozen=True)
class Turn:
  """One conversational turn to rewrite.

  context: the previous turns as (question, answer) pairs, oldest first; answer is None when the
    dataset has no answer for that turn (the prompt then shows the question alone).
  gold_ids: gold passage ids (TopiOCQA: exactly one; QReCC: one or more; may be empty for turns
    that only feed later contexts, which readers do not emit).
  rewrites: rewrites the data provides, by name (e.g. {"human": "..."}), scored as baselines.
  turn_id: the dataset's id: an int, or a string such as "1-1" (see `turn_id_value`).
  domain: the conversation's domain (MTRAG), for retrieval within it.
  """

  conv_id: str
  turn_id: int | str
  qid: str
  question: str
  context: tuple[tuple[str, str | None], ...] = ()
  gold_ids: tuple[str, ...] = ()
  rewrites: Mapping[str, str] = dataclasses.field(default_factory=dict)
  domain: str | None = None

  def to_json(self) -> dict:
    return {
        "conv_id": self.conv_id, "turn_id": self.turn_id, "qid": self.qid,
        "question": self.question, "context": [list(c) for c in self.context],
        "gold_ids": list(self.gold_ids), "rewrites": dict(self.rewrites), "domain": self.domain,
    }

  @classmethod
  def from_json(cls, d: Mapping) -> "Turn":
    return cls(
        conv_id=str(d["conv_id"]), turn_id=turn_id_value(d["turn_id"]), qid=str(d["qid"]),
        question=d["question"], context=tuple((q, a) for q, a in d.get("context", ())),
        gold_ids=tuple(d.get("gold_ids", ())), rewrites=dict(d.get("rewrites") or {}),
        domain=d.get("domain"))


def turn_id_value(v) -> int | str:
  """A turn id as stored: ints (and ASCII-digit strings) as int, other non-empty strings as given.

  Raises ValueError for anything else. ("3_2" stays a string: int() would read it as 32.)
  """
  if isinstance(v, float) and v.is_integer():
    v = int(v)
  if isinstance(v, int) and not isinstance(v, bool):
    return v
  if isinstance(v, str) and v.strip():
    s = v.strip()
    return int(s) if s.isascii() and s.isdigit() else v
  raise ValueError(f"a turn_id must be an integer or a non-empty string, got {v!r}")


@dataclasses.dataclass(frozen=True)
class Passage:
  """domain: the sub-collection the passage belongs to (MTRAG: govt, clapnq, ...), if any."""
  pid: str
  text: str
  title: str = ""
  domain: str | None = None

  @property
  def contents(self) -> str:
    """What retrievers index: title, a space, text (method.md 1.2), or the text alone."""
    return f"{self.title} {self.text}" if self.title else self.text


class Collection(Protocol):
  """Passage id <-> row index, title/text by row; implementations may stream or memory-map."""

  def __len__(self) -> int: ...
  def ids(self) -> Sequence[str]: ...
  def row_of(self, pid: str) -> int: ...
  def __getitem__(self, row: int) -> Passage: ...
  def __iter__(self) -> Iterator[Passage]: ...


class DataError(ValueError):
  """Bad input data; the message names the file, line and field."""
