"""The manifest.json of an index on disk or gs:// (BM25: bm25_store.py, dense: dense_index.py):
read and checked for its format and version, with one-line errors that say how to rebuild."""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST = "manifest.json"  # written last by a build: its presence marks a finished index


def _is_uri(p: str) -> bool:
  return "://" in p


def file_hash(path: str, chunk: int = 1 << 23) -> str:
  """BLAKE2b (16 bytes, hex) of a local file or an object, read a chunk at a time: the hash an
  index manifest records for each of its files."""
  h = hashlib.blake2b(digest_size=16)
  if _is_uri(path):
    from cqr_jax import paths
    f = paths.open_file(path, "rb")
  else:
    f = open(path, "rb")
  with f:
    while b := f.read(chunk):
      h.update(b)
  return h.hexdigest()


def fetch_checked(src: str, dst: str, size: int, digest: str, rebuild: str) -> None:
  """Copies `src` (an index file on gs://) to the local `dst` through a temporary name, and keeps
  it only when its size and hash are the manifest's."""
  from cqr_jax import paths
  tmp = dst + ".tmp"
  paths.copy(src, tmp)
  if (os.path.getsize(tmp), file_hash(tmp)) != (size, digest):
    os.remove(tmp)
    raise ValueError(f"{src}: differs from the manifest's size or hash (truncated or damaged): "
                     f"{rebuild}")
  os.replace(tmp, dst)


def read(path: str, *, fmt: str, version: int, what: str, build_cmd: str,
         local_dir: str | None = None) -> dict:
  """The manifest of the `what` index at `path` (read from `local_dir` when given)."""
  from cqr_jax import paths  # etils/fsspec: imported only where a path may be a URI
  rebuild = f"rebuild it with `{build_cmd}`"
  f = os.path.join(local_dir or path, MANIFEST)
  if not paths.exists(f):
    raise ValueError(f"{path}: no {what} index here ({MANIFEST} missing: not built, or its build "
                     f"did not finish): build one with `{build_cmd}`")
  try:
    m = json.loads(paths.read_text(f))
  except (OSError, ValueError) as e:
    raise ValueError(f"{f}: unreadable ({' '.join(str(e).split())}): {rebuild}") from None
  if not isinstance(m, dict) or m.get("format") != fmt or m.get("version") != version:
    got = (m.get("format"), m.get("version")) if isinstance(m, dict) else m
    raise ValueError(f"{path}: not a {fmt} v{version} index (format, version = {got}): {rebuild}")
  return m
