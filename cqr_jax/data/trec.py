"""TREC qrels and run files (method.md 1.4, 5.2).

Qrels: `qid 0 pid grade`, TAB-separated; whitespace-separated when a line has no TAB. Ids may
contain spaces (MTRAG), so a TAB line is split on TABs only.
Run: `qid Q0 pid rank score tag`; we write score = 200 - rank like the paper's scripts unless
scores are given.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

from cqr_jax.data.types import DataError, Qrels


def _fields(line: str) -> list[str]:
  return line.rstrip("\r\n").split("\t") if "\t" in line else line.split()


def read_qrels(path: str | os.PathLike) -> Qrels:
  """Reads a qrels file into {qid: {pid: grade}}; errors name the file and line."""
  qrels: Qrels = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = _fields(line)
      if len(parts) != 4:
        raise DataError(
            f"{path}:{lineno}: qrels line needs 4 fields (qid, 0, passage_id, relevance), "
            f"got {len(parts)}: {line.rstrip()!r}")
      qid, _, pid, grade = parts
      try:
        g = int(float(grade))
      except ValueError:
        raise DataError(f"{path}:{lineno}: relevance must be a number, got {grade!r}") from None
      qrels.setdefault(qid, {})[pid] = g
  return qrels


def write_qrels(path: str | os.PathLike, qrels: Mapping[str, Mapping[str, int]]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for qid, golds in qrels.items():
      for pid, g in golds.items():
        f.write(f"{qid}\t0\t{pid}\t{int(g)}\n")


Run = dict[str, dict[str, float]]  # qid -> {pid: score}


def write_run(path: str | os.PathLike, ranked: Mapping[str, Sequence[str]],
              scores: Mapping[str, Sequence[float]] | None = None, tag: str = "cqr-jax") -> None:
  """Writes ranked lists as a TAB-separated TREC run (score = 200 - rank unless given); `path`
  is local or a gs:// URI (cqr_jax/paths.py)."""
  from cqr_jax import paths
  with paths.open_file(path, "w") as f:
    for qid, pids in ranked.items():
      for i, pid in enumerate(pids):
        s = scores[qid][i] if scores is not None else 200 - (i + 1)
        f.write(f"{qid}\tQ0\t{pid}\t{i + 1}\t{s}\t{tag}\n")


def read_run(path: str | os.PathLike) -> Run:
  from cqr_jax import paths
  run: Run = {}
  with paths.open_file(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = _fields(line)
      if len(parts) != 6:
        raise DataError(f"{path}:{lineno}: run line needs 6 fields "
                        f"(qid Q0 pid rank score tag), got {len(parts)}")
      qid, _, pid, _, score, _ = parts
      run.setdefault(qid, {})[pid] = float(score)
  return run


def ranked_from_run(run: Mapping[str, Mapping[str, float]]) -> dict[str, list[str]]:
  """Orders each query's passages by descending score, ties by descending pid (trec_eval)."""
  return {q: [p for p, _ in sorted(d.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]
          for q, d in run.items()}


def iter_lines(path: str | os.PathLike) -> Iterable[tuple[int, str]]:
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      yield lineno, line
