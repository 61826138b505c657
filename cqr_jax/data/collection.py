"""Passage collections: in memory for small corpora, streamed from disk for 25M-54M passages.

`MemoryCollection` holds `Passage`s in a list. `FileCollection` keeps the passages in their
line-oriented source files (JSONL or TopiOCQA's TSV) and builds, once, an on-disk index of NumPy
arrays: the byte offset of every record and a sorted 64-bit hash of every passage id (with the row
it belongs to), so id -> row is a binary search plus one verifying read, and row -> passage is one
`pread`. Nothing holds millions of Python strings. The index is rebuilt when a source file's size or
mtime changes.
"""

from __future__ import annotations

import array
import csv
import hashlib
import json
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from cqr_jax.data.types import DataError, Passage

INDEX_VERSION = 1


class MemoryCollection:
  """A list of passages with an id -> row dict (fine up to a few million passages)."""

  def __init__(self, passages: Sequence[Passage], source: str = "<memory>"):
    self._passages = list(passages)
    self._rows: dict[str, int] = {}
    for i, p in enumerate(self._passages):
      if p.pid in self._rows:
        raise DataError(f"{source}: duplicate passage id {p.pid!r} "
                        f"(rows {self._rows[p.pid]} and {i})")
      self._rows[p.pid] = i

  def __len__(self) -> int:
    return len(self._passages)

  def ids(self) -> Sequence[str]:
    return [p.pid for p in self._passages]

  def row_of(self, pid: str) -> int:
    return self._rows[pid]

  def __contains__(self, pid: object) -> bool:
    return pid in self._rows

  def __getitem__(self, row: int) -> Passage:
    return self._passages[row]

  def __iter__(self) -> Iterator[Passage]:
    return iter(self._passages)


# ----------------------------------------------------------------------------- record formats
# A parser turns one raw line into (id, title, text), raising ValueError on a bad record.
def parse_jsonl_record(line: bytes) -> tuple[str, str, str]:
  """Generic / QReCC corpus line: {"id", "text" or "contents", optional "title"}."""
  obj = json.loads(line)
  if not isinstance(obj, dict):
    raise ValueError("expected a JSON object")
  if "id" not in obj:
    raise ValueError("missing field 'id'")
  text = obj.get("text", obj.get("contents"))
  if text is None:
    raise ValueError("missing field 'text' (or 'contents')")
  return str(obj["id"]), str(obj.get("title") or ""), str(text)


def parse_topiocqa_tsv_record(line: bytes) -> tuple[str, str, str]:
  """A `full_wiki_segments.tsv` row: id, text, title; title " [SEP] " -> " " (method.md 1.2)."""
  s = line.decode("utf-8").rstrip("\r\n")
  fields = next(csv.reader([s], delimiter="\t")) if '"' in s else s.split("\t")
  if len(fields) != 3:
    raise ValueError(f"expected 3 TAB-separated fields (id, text, title), got {len(fields)}")
  pid, text, title = fields
  if not pid:
    raise ValueError("empty passage id")
  return pid, title.replace(" [SEP] ", " "), text


PARSERS: dict[str, Callable[[bytes], tuple[str, str, str]]] = {
    "jsonl": parse_jsonl_record, "topiocqa_tsv": parse_topiocqa_tsv_record}


def id_hash(pid: str) -> int:
  """A stable 64-bit hash of a passage id (Python's hash() is salted per process)."""
  return int.from_bytes(hashlib.blake2b(pid.encode("utf-8"), digest_size=8).digest(), "little")


def default_index_dir(path: str | os.PathLike) -> str:
  """`<path>.cqridx` beside the data when writable, else in $CQR_JAX_CACHE or ~/.cache/cqr_jax."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  if os.access(parent, os.W_OK) and not os.environ.get("CQR_JAX_CACHE"):
    return path + ".cqridx"
  root = (os.environ.get("CQR_JAX_CACHE")
          or os.path.join(os.path.expanduser("~"), ".cache", "cqr_jax"))
  digest = hashlib.sha1(path.encode()).hexdigest()[:16]
  return os.path.join(root, "index", f"{os.path.basename(path)}-{digest}")


def _file_sig(path: str) -> dict:
  st = os.stat(path)
  return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class FileCollection:
  """Passages streamed from line-oriented files through an on-disk offset/id index.

  Args:
    files: source files, read in this order (rows are numbered across them).
    fmt: a key of `PARSERS` ("jsonl", "topiocqa_tsv").
    index_dir: where the index lives (created if needed).
    skip_header: skip each file's first line (TopiOCQA's TSV has a header).
    renumber: passage ids become the row numbers "0", "1", ... (QReCC preprocessing, method.md
      1.3); the source ids stay reachable with `raw_id`/`row_of_raw`, and the map raw -> int is
      written to `index_dir/id_map.json`.
    progress: show tqdm bars while indexing.
  """

  def __init__(self, files: Sequence[str | os.PathLike], fmt: str, index_dir: str | os.PathLike,
               skip_header: bool = False, renumber: bool = False, progress: bool = True):
    if fmt not in PARSERS:
      raise ValueError(f"unknown collection format {fmt!r}; expected one of {sorted(PARSERS)}")
    if not files:
      raise DataError(f"{index_dir}: no collection files given")
    self.files = [os.path.abspath(f) for f in files]
    self.fmt, self._parse = fmt, PARSERS[fmt]
    self.index_dir = os.fspath(index_dir)
    self.skip_header, self.renumber, self.progress = skip_header, renumber, progress
    self._meta = self._load_or_build()
    self._offsets = np.load(os.path.join(self.index_dir, "offsets.npy"), mmap_mode="r")
    self._hashes = np.load(os.path.join(self.index_dir, "id_hash.npy"), mmap_mode="r")
    self._hash_rows = np.load(os.path.join(self.index_dir, "id_rows.npy"), mmap_mode="r")
    self._starts = np.asarray(self._meta["file_starts"], dtype=np.int64)  # [F + 1]
    self._sizes = [f["size"] for f in self._meta["files"]]
    self._fds: list[int | None] = [None] * len(self.files)

  # --------------------------------------------------------------------------- index build
  def _wanted_meta(self) -> dict:
    return {"version": INDEX_VERSION, "fmt": self.fmt, "skip_header": self.skip_header,
            "renumber": self.renumber, "files": [_file_sig(f) for f in self.files]}

  def _load_or_build(self) -> dict:
    meta_path = os.path.join(self.index_dir, "meta.json")
    for f in self.files:
      if not os.path.isfile(f):
        raise DataError(f"collection file not found: {f}")
    wanted = self._wanted_meta()
    if os.path.exists(meta_path):
      with open(meta_path, encoding="utf-8") as fh:
        meta = json.load(fh)
      if all(meta.get(k) == v for k, v in wanted.items()):
        return meta
    return self._build(wanted)

  def _build(self, meta: dict) -> dict:
    from tqdm.auto import tqdm
    os.makedirs(self.index_dir, exist_ok=True)
    meta_path = os.path.join(self.index_dir, "meta.json")
    if os.path.exists(meta_path):  # invalid until this build completes
      os.remove(meta_path)
    offsets, hashes = array.array("q"), array.array("Q")
    starts = [0]
    id_map = None
    if self.renumber:
      id_map = open(os.path.join(self.index_dir, "id_map.json.tmp"), "w", encoding="utf-8")
      id_map.write("{")
    total = sum(os.path.getsize(f) for f in self.files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="indexing collection",
               disable=not self.progress)
    try:
      for path in self.files:
        with open(path, "rb") as fh:
          off = 0
          for lineno, line in enumerate(fh, 1):
            start, off = off, off + len(line)
            bar.update(len(line))
            if (lineno == 1 and self.skip_header) or not line.strip():
              continue
            try:
              pid, _, _ = self._parse(line)
            except (ValueError, UnicodeDecodeError) as e:
              raise DataError(f"{path}:{lineno}: bad collection record: {e}") from None
            if id_map is not None:
              id_map.write(f"\n{json.dumps(pid)}: {len(offsets)},")
            offsets.append(start)
            hashes.append(id_hash(pid))
        starts.append(len(offsets))
    finally:
      bar.close()
      if id_map is not None:
        id_map.close()
    if not offsets:
      raise DataError(f"collection is empty: {', '.join(self.files)}")
    if id_map is not None:  # replace the final comma, close the object
      tmp = os.path.join(self.index_dir, "id_map.json.tmp")
      with open(tmp, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\n}\n")
      os.replace(tmp, os.path.join(self.index_dir, "id_map.json"))
    h = np.frombuffer(hashes, dtype=np.uint64)
    order = np.argsort(h, kind="stable")
    np.save(os.path.join(self.index_dir, "offsets.npy"), np.frombuffer(offsets, dtype=np.int64))
    np.save(os.path.join(self.index_dir, "id_hash.npy"), h[order])
    np.save(os.path.join(self.index_dir, "id_rows.npy"), order.astype(np.int64))
    meta = dict(meta, file_starts=starts, num_rows=len(offsets))
    self._starts = np.asarray(starts, dtype=np.int64)
    self._check_duplicates(h[order], order)
    with open(os.path.join(self.index_dir, "meta.json"), "w", encoding="utf-8") as fh:
      json.dump(meta, fh, indent=1)
    return meta

  def _check_duplicates(self, sorted_h: np.ndarray, order: np.ndarray) -> None:
    same = np.nonzero(sorted_h[1:] == sorted_h[:-1])[0]
    if not len(same):
      return
    self._offsets = np.load(os.path.join(self.index_dir, "offsets.npy"), mmap_mode="r")
    self._sizes = [os.path.getsize(f) for f in self.files]
    self._fds = [None] * len(self.files)
    for i in same:
      a, b = int(order[i]), int(order[i + 1])
      ra, rb = self._record(a), self._record(b)
      if ra[0] == rb[0]:
        raise DataError(f"duplicate passage id {ra[0]!r}: {self._where(a)} and {self._where(b)}")

  # --------------------------------------------------------------------------- access
  def __len__(self) -> int:
    return int(self._offsets.shape[0])

  def _file_of(self, row: int) -> int:
    return int(np.searchsorted(self._starts, row, side="right")) - 1

  def _where(self, row: int) -> str:
    return f"{self.files[self._file_of(row)]} (record {row})"

  def _record(self, row: int) -> tuple[str, str, str]:
    if not 0 <= row < len(self):
      raise IndexError(f"row {row} out of range for a collection of {len(self)} passages")
    fi = self._file_of(row)
    start = int(self._offsets[row])
    end = int(self._offsets[row + 1]) if row + 1 < self._starts[fi + 1] else self._sizes[fi]
    if self._fds[fi] is None:
      self._fds[fi] = os.open(self.files[fi], os.O_RDONLY)
    line = os.pread(self._fds[fi], end - start, start)
    return self._parse(line.split(b"\n", 1)[0])

  def raw_id(self, row: int) -> str:
    """The id written in the source file (differs from the passage id when renumbered)."""
    return self._record(row)[0]

  def row_of_raw(self, raw: str) -> int:
    """Row of a source-file id; KeyError if absent."""
    h = np.uint64(id_hash(raw))
    lo = int(np.searchsorted(self._hashes, h, side="left"))
    hi = int(np.searchsorted(self._hashes, h, side="right"))
    for i in range(lo, hi):
      row = int(self._hash_rows[i])
      if self._record(row)[0] == raw:
        return row
    raise KeyError(raw)

  def row_of(self, pid: str) -> int:
    if self.renumber:
      if not (isinstance(pid, str) and pid.isdigit() and int(pid) < len(self)):
        raise KeyError(pid)
      return int(pid)
    return self.row_of_raw(pid)

  def __contains__(self, pid: object) -> bool:
    try:
      self.row_of(pid)  # type: ignore[arg-type]
      return True
    except KeyError:
      return False

  def _passage(self, row: int, rec: tuple[str, str, str]) -> Passage:
    pid, title, text = rec
    return Passage(str(row) if self.renumber else pid, text, title)

  def __getitem__(self, row: int) -> Passage:
    return self._passage(row, self._record(row))

  def ids(self) -> Sequence[str]:
    return _LazyIds(self)

  def __iter__(self) -> Iterator[Passage]:
    """Streams every passage in row order (buffered sequential reads)."""
    row = 0
    for path in self.files:
      with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
          if (lineno == 1 and self.skip_header) or not line.strip():
            continue
          yield self._passage(row, self._parse(line))
          row += 1

  def close(self) -> None:
    for i, fd in enumerate(self._fds):
      if fd is not None:
        os.close(fd)
        self._fds[i] = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 - interpreter shutdown
      pass


class _LazyIds(Sequence[str]):
  """Passage ids by row, read on demand."""

  def __init__(self, coll: FileCollection):
    self._c = coll

  def __len__(self) -> int:
    return len(self._c)

  def __getitem__(self, i):  # type: ignore[override]
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if i < 0:
      i += len(self)
    return str(i) if self._c.renumber else self._c.raw_id(i)

  def __iter__(self) -> Iterator[str]:
    return (p.pid for p in self._c)
