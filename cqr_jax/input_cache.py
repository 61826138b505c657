"""Model and data inputs given as gs:// URIs, copied once per host into a local cache (issue 32).

`model.source` (an HF folder, e.g. another run's `export/`, or a .gguf file),
`retrieval.dense_model` and `data.dataset` folders may live in Cloud Storage. What reads them
wants local files (safetensors and tokenizer loaders, the memory-mapped collection index), so each
host copies such an input once to `<cache>/inputs/<name>-<hash of the URI>/`, where `<cache>` is
$CQR_JAX_CACHE or ~/.cache/cqr_jax (the BM25 index cache's root); a local path is used as it is.

The copy stays valid while the objects under the URI keep their names, sizes and generations (its
`SOURCE` file lists them); after a change the input is copied again. The processes of one host
share the copy: a file lock lets one of them download while the others wait, and a download goes
to a temporary folder renamed into place once complete, so a crash never leaves a partial copy
that looks whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

from cqr_jax import paths

log = logging.getLogger("cqr_jax")

SOURCE = ".cqr_jax_source.json"  # in each copy: {"uri", "files": paths.listing(uri)}


def cache_root() -> str:
  return (os.environ.get("CQR_JAX_CACHE")
          or os.path.join(os.path.expanduser("~"), ".cache", "cqr_jax"))


def cache_dir(uri: str) -> str:
  """Where this host keeps its copy of `uri`."""
  uri = paths.absolute(uri)
  digest = hashlib.sha1(uri.encode()).hexdigest()[:16]
  return os.path.join(cache_root(), "inputs", f"{os.path.basename(uri) or 'root'}-{digest}")


def local_folder(p: str) -> str:
  """A local folder with the files under `p`: `p` itself when local, else this host's copy."""
  if not paths.is_uri(p):
    return p
  uri = paths.absolute(p)
  if not paths.isdir(uri):
    raise (NotADirectoryError(f"{p}: a file, not a folder") if paths.exists(uri)
           else FileNotFoundError(f"{p}: no such folder"))
  files = {k: v for k, v in paths.listing(uri).items() if k != SOURCE}
  return _mirror(uri, files, lambda rel: os.path.join(uri, rel))


def local_file(p: str) -> str:
  """A local path of the file `p`: `p` itself when local, else this host's copy."""
  if not paths.is_uri(p):
    return p
  uri = paths.absolute(p)
  if paths.isdir(uri) or not paths.exists(uri):
    raise (IsADirectoryError(f"{p}: a folder, not a file") if paths.isdir(uri)
           else FileNotFoundError(f"{p}: no such file"))
  name = os.path.basename(uri)
  return os.path.join(_mirror(uri, paths.listing(uri), lambda rel: uri), name)


def _mirror(uri: str, files: dict[str, dict], source_of) -> str:
  """The cached copy of `files` (paths.listing of `uri`; `source_of(name)` is a file's URI),
  downloaded when missing or stale."""
  d = cache_dir(uri)
  want = {"uri": uri, "files": files}
  os.makedirs(os.path.dirname(d), exist_ok=True)
  with host_lock(d + ".lock"):
    if _recorded(d) == want:
      return d
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix=os.path.basename(d) + ".partial-", dir=os.path.dirname(d))
    try:
      for rel, info in sorted(files.items()):
        dst = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        paths.copy(source_of(rel), dst)
        if os.path.getsize(dst) != info["size"]:
          raise OSError(f"{source_of(rel)}: copied {os.path.getsize(dst)} bytes, its listing "
                        f"said {info['size']} (changed while copying?): run again")
      with open(os.path.join(tmp, SOURCE), "w", encoding="utf-8") as f:
        json.dump(want, f, indent=1)
      if os.path.exists(d):  # stale: moved aside first, so `d` is never half old, half new
        old = f"{d}.old-{os.getpid()}"
        os.rename(d, old)
        shutil.rmtree(old, ignore_errors=True)
      os.rename(tmp, d)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    size = sum(v["size"] for v in files.values())
    log.info("copied %s (%d file(s), %.1f MB) to %s in %.1fs", uri, len(files), size / 1e6, d,
             time.time() - t0)
  return d


def _recorded(d: str) -> dict | None:
  try:
    with open(os.path.join(d, SOURCE), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


@contextlib.contextmanager
def host_lock(lock_path: str) -> Iterator[None]:
  """An exclusive lock shared by this host's processes (released when the holder exits)."""
  os.makedirs(os.path.dirname(lock_path), exist_ok=True)
  with open(lock_path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
