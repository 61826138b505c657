"""TFDS builders for conversation splits, in array_record (no TensorFlow needed: environment.md).

`prepare_tfds(source, data_dir)` writes every split of a dataset (any `load_dataset` name) as an
array_record TFDS dataset of turns, order preserved; `tfds_turns(path, split)` reads one back as a
random-access sequence of `Turn`s (decoded on access) that `TurnBatches` and grain can consume.
The collection and qrels are not stored here (they stay in their own files).
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np

from cqr_jax.data.types import Turn

FEATURE_KEYS = ("qid", "conv_id", "turn_id", "question", "context_questions", "context_answers",
                "context_has_answer", "gold_ids", "rewrites_json", "domain")


def _tfds():
  import tensorflow_datasets as tfds
  return tfds


def turn_to_example(t: Turn) -> dict:
  return {"qid": t.qid, "conv_id": t.conv_id, "turn_id": json.dumps(t.turn_id),
          "question": t.question,
          "context_questions": [q for q, _ in t.context],
          "context_answers": [a or "" for _, a in t.context],
          "context_has_answer": [a is not None for _, a in t.context],
          "gold_ids": list(t.gold_ids),
          "rewrites_json": json.dumps(dict(t.rewrites), sort_keys=True, ensure_ascii=False),
          "domain": t.domain or ""}


def _s(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def example_to_turn(ex: dict) -> Turn:
  qs = [_s(q) for q in ex["context_questions"]]
  ans = [_s(a) for a in ex["context_answers"]]
  has = [bool(h) for h in ex["context_has_answer"]]
  return Turn(conv_id=_s(ex["conv_id"]), turn_id=json.loads(_s(ex["turn_id"])), qid=_s(ex["qid"]),
              question=_s(ex["question"]),
              context=tuple((q, a if h else None) for q, a, h in zip(qs, ans, has)),
              gold_ids=tuple(_s(g) for g in ex["gold_ids"]),
              rewrites=json.loads(_s(ex["rewrites_json"])), domain=_s(ex["domain"]) or None)


def _builder_class():
  tfds = _tfds()

  class ConversationTurns(tfds.core.GeneratorBasedBuilder):
    """Turns of a conversational search dataset (one example per scored turn)."""

    VERSION = tfds.core.Version("1.1.0")  # 1.1: turn_id as JSON text (int or string ids)
    # TFDS locates a builder's source file through importlib_resources (not installed): a builder
    # made at run time has no checksums file or code path to find.
    code_path = None

    def __init__(self, *, source: str = "", splits: Sequence[str] = ("train", "test"), **kw):
      self._source, self._splits = source, tuple(splits)
      super().__init__(**kw)

    def _info(self):
      f = tfds.features
      return tfds.core.DatasetInfo(
          builder=self, disable_shuffling=True,
          description=f"cqr-jax conversation turns from {self._source!r}",
          features=f.FeaturesDict({
              "qid": f.Text(), "conv_id": f.Text(), "turn_id": f.Text(), "question": f.Text(),
              "context_questions": f.Sequence(f.Text()), "context_answers": f.Sequence(f.Text()),
              "context_has_answer": f.Sequence(np.bool_), "gold_ids": f.Sequence(f.Text()),
              "rewrites_json": f.Text(), "domain": f.Text()}))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s in self._splits}

    def _generate_examples(self, split="train"):
      from cqr_jax.data.dataset import load_dataset
      ds = load_dataset(self._source, split)
      for i, t in enumerate(ds.turns):
        yield i, turn_to_example(t)

  return ConversationTurns


def config_name(source: str) -> str:
  """A TFDS config name for a source string (letters, digits, underscores)."""
  return re.sub(r"[^a-z0-9]+", "_", source.lower()).strip("_")[:60] or "default"


def prepare_tfds(source: str, data_dir: str | os.PathLike,
                 splits: Sequence[str] = ("train", "test")):
  """Builds (once) the array_record TFDS dataset of `source`'s splits; returns the builder."""
  tfds = _tfds()
  cls = _builder_class()
  b = cls(source=source, splits=splits, data_dir=os.fspath(data_dir), file_format="array_record",
          config=tfds.core.BuilderConfig(name=config_name(source)))
  b.download_and_prepare()
  return b


class TurnSource(Sequence[Turn]):
  """A TFDS array_record split as a random-access sequence of Turns."""

  def __init__(self, data_source):
    self._src = data_source

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i):  # type: ignore[override]
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      raise IndexError(f"turn {i} out of range ({len(self)} turns)")
    return example_to_turn(self._src[i % len(self)])

  def __iter__(self):
    return (self[i] for i in range(len(self)))


def tfds_turns(builder_or_dir, split: str) -> TurnSource:
  """Turns of one split, from a prepared builder or its versioned directory."""
  tfds = _tfds()
  b = builder_or_dir
  if isinstance(b, (str, os.PathLike)):
    b = tfds.builder_from_directory(os.fspath(b))
  return TurnSource(b.as_data_source(split=split))
