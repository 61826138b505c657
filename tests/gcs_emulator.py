"""A local Cloud Storage for tests: `gcp-storage-emulator` (PyPI, the `test` extra) in its own
process, so gs:// run folders are tested without a cloud (issue 32).

The clients find it through the environment that `gcs_emulator()` yields; pass it to the
processes under test (each client reads it when it first connects):
- gcsfs (etils.epath's gs:// backend without TensorFlow) and google-cloud-storage (tensorboardX's
  gs:// writer): `STORAGE_EMULATOR_HOST`;
- TensorStore (Orbax's array files): `TENSORSTORE_GCS_HTTP_URL`, and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` in place of Google credentials;
- `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: gcsfs then skips asking Google's control plane for
  the bucket's type, which needs credentials (a warning per bucket otherwise).

The emulator is started through `serve` below, which adds what TensorStore relies on and the
package leaves out: the object's generation in the `x-goog-generation` header of a read (without
it TensorStore fails with "Malformed StorageGeneration" when it reads an OCDBT manifest back,
and the other process then waits for the failed one's checkpoint forever), and
`ifGenerationMatch` preconditions on media uploads (412 when not met), which OCDBT's manifest
updates depend on.

Example:
  with gcs_emulator("bkt") as env:
    subprocess.run([...], env={**os.environ, **env})  # gs://bkt/... is served locally
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from tests.multiprocess import REPO_ROOT, free_port


def available() -> bool:
  return importlib.util.find_spec("gcp_storage_emulator") is not None


@contextlib.contextmanager
def gcs_emulator(bucket: str = "cqr-test", timeout_s: float = 30.0) -> Iterator[dict[str, str]]:
  """Serves an empty in-memory bucket on a free local port; yields the clients' environment."""
  port = free_port()
  with tempfile.TemporaryFile() as err:
    proc = subprocess.Popen([sys.executable, "-m", "tests.gcs_emulator", str(port), bucket],
                            stdout=subprocess.DEVNULL, stderr=err, cwd=REPO_ROOT)
    try:
      yield _wait(proc, port, err, timeout_s)
    finally:
      proc.terminate()
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait(proc: subprocess.Popen, port: int, err, timeout_s: float) -> dict[str, str]:
  """Waits until the emulator listens; returns the clients' environment."""
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
      break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        err.seek(0)
        raise RuntimeError("the GCS emulator did not start: "
                           + err.read().decode(errors="replace")[-2000:]) from None
      time.sleep(0.1)
  url = f"http://127.0.0.1:{port}"
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "cqr-test",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


# ------------------------------------------------------------------------------- the server

def _generation(storage, bucket: str, name: str | None) -> str:
  """The object's current generation, "0" when it does not exist (GCS's convention)."""
  from gcp_storage_emulator.exceptions import NotFound
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except (NotFound, KeyError, TypeError):
    return "0"


def _patch_handlers() -> None:
  """Read generations and upload preconditions (module docstring); before the server module
  is imported, which binds the handlers into its routing table."""
  from http import HTTPStatus

  from gcp_storage_emulator.handlers import objects

  download, insert = objects.download, objects.insert

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      p = request.params
      response["x-goog-generation"] = _generation(storage, p["bucket_name"], p["object_id"])
      response["x-goog-metageneration"] = "1"

  def insert_if_generation_match(request, response, storage, *args, **kwargs):
    want = (request.query.get("ifGenerationMatch") or [None])[0]
    name = (request.query.get("name") or [None])[0]  # a media upload's (TensorStore's); a
    # multipart upload names its object in the body, and goes unchecked
    if want is not None and name is not None and (
        _generation(storage, request.params["bucket_name"], name) != want):
      response.status = HTTPStatus.PRECONDITION_FAILED
      response.json({"error": {"code": 412, "message": "conditionNotMet"}})
      return None
    return insert(request, response, storage, *args, **kwargs)

  objects.download = download_with_generation
  objects.insert = insert_if_generation_match


def serve(port: int, bucket: str) -> None:
  """Runs the patched emulator on 127.0.0.1:`port` with an empty in-memory `bucket`."""
  import logging
  logging.basicConfig(level=logging.CRITICAL)
  _patch_handlers()
  from gcp_storage_emulator.server import create_server
  create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  serve(int(sys.argv[1]), sys.argv[2])
