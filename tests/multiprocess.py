"""Runs N cooperating JAX processes on this machine (a pod simulated with CPU collectives).

Each child gets `CQR_COORDINATOR`, `CQR_NUM_PROCESSES`, `CQR_PROCESS_ID` and `CQR_LOCAL_DEVICES`
in its environment, so a script (or `cqr-jax <stage> --distributed`) only has to call
`cqr_jax.distributed.initialize()`. The parent's fake-device XLA flag is removed from the
children (they size their CPU device count through `CQR_LOCAL_DEVICES`).

A timeout, or one child failing while the others wait in a collective, kills every child and
raises `MultiprocessError` with all their output, so a broken test fails instead of hanging.

Example:
  results = run_processes([sys.executable, script, out_dir], num_processes=2, local_devices=4)
  assert all(r.returncode == 0 for r in results)
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from typing import Mapping, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class ProcessResult:
  process_id: int
  returncode: int | None  # None: killed (timeout or a sibling failed)
  stdout: str
  stderr: str


class MultiprocessError(AssertionError):
  """Some process failed or the group timed out; the message holds every process's output."""


def free_port() -> int:
  """A TCP port that was free a moment ago on 127.0.0.1."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env(base: Mapping[str, str], extra: Mapping[str, str] | None) -> dict[str, str]:
  env = dict(base)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  if flags.strip():
    env["XLA_FLAGS"] = flags.strip()
  else:
    env.pop("XLA_FLAGS", None)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
  env.update(extra or {})
  return env


def _report(results: Sequence[ProcessResult], why: str) -> str:
  parts = [why]
  for r in results:
    parts.append(f"--- process {r.process_id} (returncode {r.returncode}) stdout ---\n"
                 f"{r.stdout[-4000:]}\n--- process {r.process_id} stderr ---\n{r.stderr[-6000:]}")
  return "\n".join(parts)


def run_processes(argv: Sequence[str], num_processes: int = 2, local_devices: int = 4,
                  timeout_s: float = 120.0, env: Mapping[str, str] | None = None,
                  cwd: str | None = None, check: bool = True) -> list[ProcessResult]:
  """Starts `num_processes` copies of `argv` joined through a coordinator on a free local port.

  Args:
    argv: the command each process runs (e.g. [sys.executable, script, arg]).
    num_processes: processes to start; 1 runs a single process with `local_devices` devices
      (the reference run to compare a multi-process run against).
    local_devices: fake CPU devices per process.
    timeout_s: wall-clock limit for the whole group.
    env: extra environment variables for every child.
    cwd: working directory (default: the repository root).
    check: raise MultiprocessError unless every process exits 0.
  Returns:
    One ProcessResult per process, in process order.
  """
  coordinator = f"127.0.0.1:{free_port()}"
  with tempfile.TemporaryDirectory(prefix="cqr-mp-") as tmp:
    procs, files = [], []
    for i in range(num_processes):
      out = open(os.path.join(tmp, f"{i}.out"), "w+")
      err = open(os.path.join(tmp, f"{i}.err"), "w+")
      child_env = _child_env(os.environ, {
          "CQR_COORDINATOR": coordinator,
          "CQR_NUM_PROCESSES": str(num_processes),
          "CQR_PROCESS_ID": str(i),
          "CQR_LOCAL_DEVICES": str(local_devices),
          **(env or {}),
      })
      procs.append(subprocess.Popen(list(argv), stdout=out, stderr=err, env=child_env,
                                    cwd=cwd or REPO_ROOT))
      files.append((out, err))

    why = None
    deadline = time.monotonic() + timeout_s
    while True:
      codes = [p.poll() for p in procs]
      if all(c is not None for c in codes):
        break
      if any(c not in (None, 0) for c in codes):
        why = "a process failed; stopped the others"
        break
      if time.monotonic() > deadline:
        why = f"timed out after {timeout_s:.0f} s"
        break
      time.sleep(0.05)
    if why:
      for p in procs:
        if p.poll() is None:
          p.kill()
      for p in procs:
        p.wait()

    results = []
    for i, (p, (out, err)) in enumerate(zip(procs, files)):
      out.seek(0)
      err.seek(0)
      code = p.returncode if p.returncode is not None and p.returncode >= 0 else None
      results.append(ProcessResult(i, code, out.read(), err.read()))
      out.close()
      err.close()
  if check and (why or any(r.returncode != 0 for r in results)):
    raise MultiprocessError(_report(results, why or "a process exited with an error"))
  return results


def run_python(code: str, num_processes: int = 2, local_devices: int = 4,
               args: Sequence[str] = (), **kwargs) -> list[ProcessResult]:
  """Like `run_processes`, for a Python source string (written to a temporary file)."""
  with tempfile.NamedTemporaryFile("w", suffix=".py", prefix="cqr_mp_", delete=False) as f:
    f.write(code)
    path = f.name
  try:
    return run_processes([sys.executable, path, *args], num_processes=num_processes,
                         local_devices=local_devices, **kwargs)
  finally:
    os.unlink(path)
