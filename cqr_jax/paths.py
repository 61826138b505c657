"""Run-folder paths on a local disk or in Cloud Storage (design.md "Runs on disk"; issue 32).

A run folder, checkpoint folder or output file is a string: a local path or a URI
(`gs://bucket/runs/name`). Strings compose with `os.path.join`, `dirname` and `basename`, which
keep a URI's `scheme://`; `os.path.abspath` and `normpath` do not (`gs://b` -> `<cwd>/gs:/b`), so
`absolute` is the one way to make a path absolute. Every file operation here goes through
`etils.epath.Path` (gcsfs for gs:// without TensorFlow): a local path behaves as with the os
module, and a gs:// run folder is one folder that every host of a pod sees.

Object stores have no append and no atomic rename: `append_text` rewrites the object, and
`write_text` writes a local file through a temporary and `os.replace` but an object in one upload
(an object appears whole or not at all). Several processes share a gs:// folder, so gcsfs's
listing cache is off (a cached listing would hide another host's new file).
"""

from __future__ import annotations

import os
from typing import IO

from etils import epath

try:  # before the first gcsfs filesystem is made (fsspec caches instances by their arguments)
  import fsspec.config
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
except ImportError:  # pragma: no cover - etils pulls fsspec; gs:// needs it anyway
  pass

PathLike = str | os.PathLike


def is_uri(p: PathLike) -> bool:
  """True for `scheme://...` (gs://, s3://, ...), False for a local path."""
  return "://" in os.fspath(p)


def absolute(p: PathLike) -> str:
  """A local path made absolute; a URI as given (without a trailing slash)."""
  s = os.fspath(p)
  return s.rstrip("/") if is_uri(s) else os.path.abspath(s)


def path(p: PathLike) -> epath.Path:
  return epath.Path(os.fspath(p))


def exists(p: PathLike) -> bool:
  return os.path.exists(p) if not is_uri(p) else path(p).exists()


def isdir(p: PathLike) -> bool:
  """A folder (on an object store: a prefix that holds at least one object)."""
  return os.path.isdir(p) if not is_uri(p) else path(p).is_dir()


def listdir(p: PathLike) -> list[str]:
  """The names in a folder ([] when it does not exist)."""
  if not is_uri(p):
    return os.listdir(p) if os.path.isdir(p) else []
  d = path(p)
  return [c.name for c in d.iterdir()] if d.is_dir() else []


def nonempty_dir(p: PathLike) -> bool:
  return isdir(p) and bool(listdir(p))


def makedirs(p: PathLike) -> None:
  """Creates a folder and its parents (a no-op on an object store, which has no folders)."""
  if is_uri(p):
    path(p).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(p, exist_ok=True)


def open_file(p: PathLike, mode: str = "r") -> IO:
  """Opens a file for reading or writing (text modes are UTF-8)."""
  if is_uri(p):
    return path(p).open(mode)
  return open(p, mode, encoding=None if "b" in mode else "utf-8")


def read_text(p: PathLike) -> str:
  with open_file(p) as f:
    return f.read()


def write_text(p: PathLike, text: str) -> None:
  """Writes a whole file atomically: a local file through `<p>.tmp` and os.replace (fsynced), an
  object in one upload. The parent folder is created."""
  makedirs(os.path.dirname(os.fspath(p)) or ".")
  if is_uri(p):
    path(p).write_text(text)
    return
  tmp = os.fspath(p) + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, p)


def append_text(p: PathLike, text: str) -> None:
  """Appends to a file (created if missing), durably: a local file is appended to and fsynced,
  an object is rewritten with `text` after its content (one writer: process 0)."""
  if not is_uri(p):
    with open(p, "a", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    return
  q = path(p)
  q.write_text((q.read_text() if q.exists() else "") + text)


def open_append(p: PathLike) -> IO:
  """A text file opened for appending: a local file as `open(p, "a")`; for an object, a writer
  whose `flush` (and close) uploads the object's earlier content with what was written since."""
  if is_uri(p):
    return _ObjectAppender(p)
  return open(p, "a", encoding="utf-8")


def fsync(f: IO) -> None:
  """Makes what was written to `f` durable: flush, then fsync a local file."""
  f.flush()
  if not isinstance(f, _ObjectAppender):
    os.fsync(f.fileno())


class _ObjectAppender:
  """`open_append` for an object store, which cannot append: the content is kept here and the
  whole object rewritten on `flush` (one writer per object: process 0)."""

  def __init__(self, p: PathLike):
    self._path = path(p)
    self._text = self._path.read_text() if self._path.exists() else ""
    self._dirty = False

  def write(self, text: str) -> int:
    self._text += text
    self._dirty = True
    return len(text)

  def flush(self) -> None:
    if self._dirty:
      self._path.write_text(self._text)
      self._dirty = False

  def close(self) -> None:
    self.flush()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def remove(p: PathLike) -> None:
  if exists(p):
    path(p).unlink()


def rmtree(p: PathLike) -> None:
  if isdir(p):
    path(p).rmtree()


def files_under(root: PathLike) -> list[str]:
  """Every file under `root` (recursively; [] when it does not exist), sorted."""
  if not is_uri(root):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs)
  out, todo = [], [path(root)] if isdir(root) else []
  while todo:  # (epath's gs:// walk drops the scheme and rglob refuses `**`)
    for child in todo.pop().iterdir():
      (todo if child.is_dir() else out).append(child)
  return sorted(os.fspath(f) for f in out)


def copy(src: PathLike, dst: PathLike) -> None:
  """Copies one file (either side local or a URI), replacing `dst`."""
  path(src).copy(path(dst), overwrite=True)


def copy_tree(src: PathLike, dst: PathLike) -> None:
  """Copies the files under the local folder `src` to `dst` (a local folder or a URI)."""
  src = os.fspath(src)
  for root, _, files in os.walk(src):
    rel = os.path.relpath(root, src)
    out = dst if rel == "." else os.path.join(os.fspath(dst), rel)
    makedirs(out)
    for name in files:
      copy(os.path.join(root, name), os.path.join(os.fspath(out), name))


def listing(p: PathLike) -> dict[str, dict]:
  """{name relative to `p`: {"size", "version"}} of every file under the folder `p`, or
  {basename: ...} when `p` is one file ({} when neither exists). `version` is what changes when
  the content does: an object's generation (else its MD5), a local file's mtime."""
  s = os.fspath(p).rstrip("/")
  if not is_uri(s):
    if os.path.isfile(s):
      return {os.path.basename(s): _local_info(s)}
    return {os.path.relpath(f, s): _local_info(f) for f in files_under(s)}
  import fsspec
  fs, root = fsspec.core.url_to_fs(s)
  out = {}
  for name, info in fs.find(root, detail=True).items():
    if info.get("type") == "directory" or name.endswith("/"):
      continue  # a folder placeholder object
    rel = os.path.basename(name) if name == root else name[len(root) + 1:]
    version = info.get("generation") or info.get("md5Hash") or info.get("etag") or ""
    out[rel] = {"size": int(info["size"]), "version": str(version)}
  return out


def _local_info(f: str) -> dict:
  st = os.stat(f)
  return {"size": st.st_size, "version": str(st.st_mtime_ns)}
