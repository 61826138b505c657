"""`Dataset` (turns + collection + qrels) and `load_dataset`, the one entry point stages call.

Names: "synthetic" / "synthetic:tiny" / "synthetic:<size>:<seed>" (the embedded benchmark,
generated in memory), "mtrag" / "mtrag:un" / "mtrag:human" (the MTRAG conversations shipped in the
package, mtrag_reader.py), "topiocqa:<dir>", "qrecc:<dir>", or a folder in the generic layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from cqr_jax.data.types import Collection, DataError, Qrels, Turn

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Dataset:
  """One split of a conversational search dataset.

  stats: reader counts (turns read, emitted, skipped and why, gold ids missing from the collection).
  """

  name: str
  split: str
  turns: list[Turn]
  collection: Collection
  qrels: Qrels
  stats: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.turns)

  def summary(self) -> str:
    s = ", ".join(f"{k}={v}" for k, v in self.stats.items() if not isinstance(v, (list, dict)))
    return (f"{self.name} [{self.split}]: {len(self.turns)} turns, {len(self.collection)} passages"
            + (f" ({s})" if s else ""))


class GoldChecker:
  """Counts gold ids missing from the collection (method.md 1: every scored turn needs a gold).

  In strict mode the first missing id is an error naming where it came from.
  """

  def __init__(self, collection: Collection, strict: bool):
    self.collection, self.strict = collection, strict
    self.missing = 0
    self.examples: list[str] = []

  def present(self, pid: str, where: str) -> bool:
    if pid in self.collection:  # type: ignore[operator]
      return True
    if self.strict:
      raise DataError(f"{where}: gold passage id {pid!r} is not in the collection")
    self.missing += 1
    if len(self.examples) < 5:
      self.examples.append(f"{where}: {pid}")
    return False

  def report(self, stats: dict[str, Any]) -> None:
    stats["gold_ids_missing"] = self.missing
    if self.missing:
      stats["gold_ids_missing_examples"] = list(self.examples)
      log.warning("%d gold passage ids are not in the collection (e.g. %s); those golds were "
                  "dropped (strict=True makes this an error)", self.missing, self.examples[0])


def check_question(question: Any, where: str) -> str:
  if not isinstance(question, str) or not question.strip():
    raise DataError(f"{where}: empty or missing question ({question!r})")
  return question


def load_dataset(name_or_path: str, split: str = "train", strict: bool = False,
                 progress: bool = True, **kw) -> Dataset:
  """Loads one split (see the module docstring for names).

  Args:
    name_or_path: dataset name or folder.
    split: "train" or "test" (TopiOCQA's "dev" is its test split; "test" is accepted for it).
    strict: gold ids missing from the collection are an error instead of a counted warning.
    progress: progress bars while indexing large collections.
    **kw: reader-specific options (synthetic: size, seed; files: index_dir, ...).
  """
  kind, _, rest = name_or_path.partition(":")
  if kind == "synthetic":
    from cqr_jax.data import synthetic
    parts = [p for p in rest.split(":") if p] if rest else []
    size = parts[0] if parts else kw.pop("size", "default")
    seed = int(parts[1]) if len(parts) > 1 else int(kw.pop("seed", 0))
    if kw:
      raise TypeError(f"synthetic dataset: unexpected options {sorted(kw)}")
    return synthetic.synthetic_dataset(size=size, seed=seed, split=split)
  if kind == "mtrag" and not os.path.isdir(name_or_path):
    from cqr_jax.data import mtrag_reader
    return mtrag_reader.read_mtrag(split, rest or "all", **kw)
  if kind == "topiocqa" and rest:
    from cqr_jax.data import topiocqa
    return _read_copy(rest, lambda root: topiocqa.read_topiocqa(
        root, split, strict=strict, progress=progress, **kw))
  if kind == "qrecc" and rest:
    from cqr_jax.data import qrecc
    return _read_copy(rest, lambda root: qrecc.read_qrecc(
        root, split, strict=strict, progress=progress, **kw))
  if "://" in name_or_path or os.path.isdir(name_or_path):
    from cqr_jax.data import generic
    return _read_copy(name_or_path, lambda root: generic.read_generic(
        root, split, strict=strict, progress=progress, **kw))
  raise DataError(f"unknown dataset {name_or_path!r}: expected 'synthetic[:size[:seed]]', "
                  "'mtrag[:un|:human]', 'topiocqa:<dir>', 'qrecc:<dir>' or an existing folder in "
                  "the generic layout (conversations.jsonl, corpus.jsonl, qrels.tsv); a <dir> "
                  "may be a gs:// URI")


def _read_copy(root: str, read) -> Dataset:
  """read(root) for a local folder; for a gs:// folder, read(this host's copy) (the readers
  seek in files and index them on disk: cqr_jax/input_cache.py), its errors and name given
  in terms of the URI."""
  if "://" not in root:
    return read(root)
  from cqr_jax import input_cache
  try:
    local = input_cache.local_folder(root)
  except (FileNotFoundError, NotADirectoryError) as e:
    raise DataError(f"data.dataset: {e}") from None
  try:
    ds = read(local)
  except DataError as e:
    raise DataError(str(e).replace(local, root.rstrip("/"))) from None
  root = root.rstrip("/")
  name = os.path.basename(root) if ds.name == os.path.basename(local) else ds.name
  return dataclasses.replace(ds, name=name.replace(local, root))
