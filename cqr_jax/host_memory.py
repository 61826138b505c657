"""Transparent huge pages for host buffers: one re-exec at start-up on Linux.

XLA:CPU gives every call of a compiled program fresh buffers for its temporaries, gigabytes for a
training micro-batch, and glibc serves them from new mmap'd regions. With the kernel's transparent
huge pages in `madvise` mode (the common default), those regions are faulted in 4 KiB at a time,
every call (a packed GRPO update of SmolLM2-135M faults in tens of GB a step this way).
glibc's `glibc.malloc.hugetlb=1` tunable marks its mmap'd chunks MADV_HUGEPAGE, so the same
memory arrives in 2 MiB pages: a few hundred times fewer faults (`python bench/bench_update.py`
runs both sides with it).

Tunables are read when the process starts, so `ensure_huge_pages` re-executes the process once
with the tunable added to GLIBC_TUNABLES. It does nothing where JAX will not run on the CPU (an
accelerator's host: `cpu_backend`), off Linux, when THP is `always` (not needed) or `never` (no
use), when the tunable is already set, or with CQR_JAX_HUGE_PAGES=0.
"""

from __future__ import annotations

import glob
import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
OPT_OUT = "CQR_JAX_HUGE_PAGES"
# Device files of the accelerators JAX would pick over the CPU (TPU VMs: accel or vfio; GPUs).
ACCELERATOR_FILES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def cpu_backend(environ, accelerator_files=ACCELERATOR_FILES) -> bool:
  """Whether JAX will run on the CPU, decided before JAX is imported: the first platform of
  JAX_PLATFORMS when it is set, else whether no accelerator device file exists."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(glob.glob(p) for p in accelerator_files)


def thp_mode(path: str = THP_MODE) -> str | None:
  """The kernel's THP mode (the bracketed word of `path`: always / madvise / never), or None."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def tunables_with_huge_pages(environ) -> str | None:
  """The GLIBC_TUNABLES value that adds TUNABLE, or None if no re-exec is due."""
  current = environ.get("GLIBC_TUNABLES", "")
  if environ.get(OPT_OUT) == "0" or "glibc.malloc.hugetlb" in current:
    return None
  if not cpu_backend(environ):
    return None
  if not sys.platform.startswith("linux") or thp_mode() != "madvise":
    return None
  return f"{current}:{TUNABLE}" if current else TUNABLE


def ensure_huge_pages() -> None:
  """Re-executes this process (same interpreter and command line) with TUNABLE set, if due.
  Call it first thing in a program's entry point, before any work worth keeping."""
  value = tunables_with_huge_pages(os.environ)
  if value is None:
    return
  env = dict(os.environ, GLIBC_TUNABLES=value)
  env.setdefault(OPT_OUT, "0")  # never twice, even if glibc ignores the tunable
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)
