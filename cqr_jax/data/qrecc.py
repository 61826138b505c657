"""QReCC from the SCAI-QReCC-21 files (method.md 1.3).

Files under the given folder:
- turns: `scai-qrecc21-{training,test}-turns.json` (a JSON list: Conversation_no, Turn_no,
  Conversation_source, Question, Truth_rewrite, Truth_answer, Truth_passages = raw passage ids),
- collection: the unzipped `passages.zip`, i.e. `collection-paragraph/{commoncrawl,wayback,
  wayback-backfill}/*.jsonl` (lines {id: "<doc>_p<k>", contents}), directly under the folder or
  under `passages/`; keep `passages.zip` beside it (in the folder or next to
  `collection-paragraph/`) for the official numbering.
Passages are renumbered 0, 1, 2, ... as the official preprocessing does (method.md 1.3): the
zip's .jsonl members in the zip's own order, commoncrawl ones first, then every path containing
"wayback" (wayback-backfill included); without the zip, in sorted path order (a warning: the
integer ids then differ from the official id map). The raw -> int map is written as JSON
(index_dir/id_map.json).
Context = every previous turn's (Question, Truth_answer or "UNANSWERABLE"); turns without
Truth_passages are not emitted but stay in later contexts. Query ids `QReCC-{Train,Test}_{conv}_
{turn}`; qrels hold every gold. Truth_rewrite is exposed as the `human` rewrite.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import zipfile
from typing import Any

from cqr_jax.data.collection import FileCollection, default_index_dir
from cqr_jax.data.dataset import Dataset, GoldChecker, check_question
from cqr_jax.data.types import DataError, Turn

log = logging.getLogger("cqr_jax")
SPLITS = {"train": ("training", "Train"), "test": ("test", "Test")}
UNANSWERABLE = "UNANSWERABLE"


_DIR = "collection-paragraph"


def zip_member_order(root: str, cand: str) -> tuple[list[str] | None, str | None]:
  """(the .jsonl members of passages.zip in the zip's order, as paths under
  collection-paragraph/; the zip's path), or (None, None) when there is no zip."""
  for z in (os.path.join(root, "passages.zip"), os.path.join(os.path.dirname(cand),
                                                             "passages.zip")):
    if os.path.isfile(z):
      try:
        with zipfile.ZipFile(z) as f:
          names = f.namelist()
      except zipfile.BadZipFile as e:
        raise DataError(f"{z}: not a readable zip ({e})") from None
      return [n.split(_DIR + "/", 1)[-1] for n in names if n.endswith(".jsonl")], z
  return None, None


def collection_files(root: str) -> tuple[str, list[str]]:
  """(collection-paragraph dir, its .jsonl files in renumbering order: module docstring)."""
  for cand in (os.path.join(root, _DIR), os.path.join(root, "passages", _DIR)):
    if os.path.isdir(cand):
      break
  else:
    hint = (" (unzip passages.zip first)" if glob.glob(os.path.join(root, "*.zip")) else "")
    raise DataError(f"{root}: no collection-paragraph/ folder{hint}")
  on_disk = sorted(os.path.relpath(f, cand).replace(os.sep, "/") for f in
                   glob.glob(os.path.join(cand, "**", "*.jsonl"), recursive=True))
  if not on_disk:
    raise DataError(f"{cand}: no .jsonl files")
  rel, zpath = zip_member_order(root, cand)
  if rel is None:
    log.warning("%s: passages.zip not found: QReCC passages are numbered in sorted path order, "
                "so their integer ids differ from the official preprocessing's (keep "
                "passages.zip beside collection-paragraph/)", cand)
    rel = on_disk
  elif sorted(rel) != on_disk:
    missing = sorted(set(rel) - set(on_disk))[:3]
    extra = sorted(set(on_disk) - set(rel))[:3]
    raise DataError(f"{cand}: the extracted files differ from {zpath} (not extracted: {missing}; "
                    f"not in the zip: {extra})")
  wayback = [r for r in rel if "wayback" in r]  # the official test order: wayback first
  common = [r for r in rel if "wayback" not in r and "commoncrawl" in r]
  other = [r for r in rel if "wayback" not in r and "commoncrawl" not in r]
  if other:
    raise DataError(f"{cand}: unexpected collection files outside commoncrawl/ and wayback*/: "
                    f"{other[:3]}")
  return cand, [os.path.join(cand, r) for r in common + wayback]


def open_collection(root: str, index_dir: str | None = None,
                    progress: bool = True) -> FileCollection:
  cdir, files = collection_files(root)
  return FileCollection(files, "jsonl", index_dir or default_index_dir(cdir), renumber=True,
                        progress=progress)


def read_qrecc(root: str | os.PathLike, split: str = "train", strict: bool = False,
               progress: bool = True, index_dir: str | None = None,
               collection: FileCollection | None = None) -> Dataset:
  """Reads one split ("train" or "test")."""
  root = os.fspath(root)
  if split not in SPLITS:
    raise ValueError(f"QReCC split must be one of {sorted(SPLITS)}, got {split!r}")
  fname, tag = SPLITS[split]
  path = next((p for p in (os.path.join(root, f"scai-qrecc21-{fname}-turns.json"),
                           os.path.join(root, "scai-qrecc21", f"scai-qrecc21-{fname}-turns.json"))
               if os.path.isfile(p)), None)
  if path is None:
    raise DataError(f"{root}: scai-qrecc21-{fname}-turns.json not found")
  if collection is None:
    collection = open_collection(root, index_dir, progress)
  try:
    with open(path, encoding="utf-8") as f:
      records = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
  if not isinstance(records, list):
    raise DataError(f"{path}: expected a JSON list of turns")
  raw_gold = _RawGold(collection, strict)
  stats: dict[str, Any] = dict(turns_read=len(records), turns_no_gold=0,
                               turns_no_gold_in_collection=0)
  turns: list[Turn] = []
  qrels: dict[str, dict[str, int]] = {}
  contexts: dict[str, list[tuple[str, str | None]]] = {}
  last_turn: dict[str, int] = {}
  for i, r in enumerate(records):
    try:
      conv, turn = str(r["Conversation_no"]), int(r["Turn_no"])
      question = r["Question"]
    except (KeyError, TypeError, ValueError) as e:
      raise DataError(f"{path}: record {i}: missing or bad field {e}") from None
    where = f"{path}: record {i} (conversation {conv}, turn {turn})"
    if conv in last_turn and turn != last_turn[conv] + 1:
      raise DataError(f"{where}: turns are not consecutive (turn {turn} after {last_turn[conv]})")
    last_turn[conv] = turn
    check_question(question, where)
    answer = r.get("Truth_answer") or UNANSWERABLE
    context = contexts.setdefault(conv, [])
    raw = [str(p) for p in (r.get("Truth_passages") or [])]
    if not raw:
      stats["turns_no_gold"] += 1
    else:
      golds = [pid for pid in (raw_gold.pid(p, where) for p in raw) if pid is not None]
      golds = list(dict.fromkeys(golds))
      if not golds:
        stats["turns_no_gold_in_collection"] += 1
      else:
        qid = f"QReCC-{tag}_{conv}_{turn}"
        rw = r.get("Truth_rewrite")
        turns.append(Turn(conv_id=conv, turn_id=turn, qid=qid, question=question,
                          context=tuple(context), gold_ids=tuple(golds),
                          rewrites={"human": rw} if isinstance(rw, str) and rw.strip() else {},
                          domain=r.get("Conversation_source")))
        qrels[qid] = dict.fromkeys(golds, 1)
    context.append((question, answer))
  stats["turns_emitted"] = len(turns)
  raw_gold.checker.report(stats)
  return Dataset(name=f"qrecc:{root}", split=split, turns=turns, collection=collection,
                 qrels=qrels, stats=stats)


class _RawGold:
  """Raw QReCC passage id -> renumbered id, through the collection's hash index."""

  def __init__(self, collection, strict: bool):
    self.collection = collection
    self.checker = GoldChecker(_RawView(collection), strict)

  def pid(self, raw: str, where: str) -> str | None:
    if not self.checker.present(raw, where):
      return None
    return str(self.collection.row_of_raw(raw))


class _RawView:
  def __init__(self, c):
    self.c = c

  def __contains__(self, raw: str) -> bool:
    try:
      self.c.row_of_raw(raw)
      return True
    except KeyError:
      return False
