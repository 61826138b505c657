"""The start-up re-exec that turns on glibc's huge-page tunable (cqr_jax.host_memory)."""

import os
import subprocess
import sys

import pytest

from cqr_jax import host_memory


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert host_memory.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert host_memory.thp_mode(str(path)) == "always"
  assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def test_cpu_backend_from_jax_platforms_or_device_files(tmp_path):
  none = (str(tmp_path / "accel[0-9]*"),)
  assert host_memory.cpu_backend({}, none)
  (tmp_path / "accel0").write_text("")
  assert not host_memory.cpu_backend({}, none)  # a TPU VM's chip
  assert host_memory.cpu_backend({"JAX_PLATFORMS": "cpu"}, none)
  assert not host_memory.cpu_backend({"JAX_PLATFORMS": "tpu,cpu"}, ())
  assert host_memory.cpu_backend({"JAX_PLATFORMS": " cpu "}, ())


def test_tunables_value(monkeypatch):
  monkeypatch.setattr(host_memory, "cpu_backend", lambda environ: True)
  monkeypatch.setattr(host_memory.sys, "platform", "linux")
  monkeypatch.setattr(host_memory, "thp_mode", lambda: "madvise")
  assert host_memory.tunables_with_huge_pages({}) == "glibc.malloc.hugetlb=1"
  assert (host_memory.tunables_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  # already set, opted out, or THP not in madvise mode: no re-exec
  assert host_memory.tunables_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert host_memory.tunables_with_huge_pages({"CQR_JAX_HUGE_PAGES": "0"}) is None
  for mode in ("always", "never", None):
    monkeypatch.setattr(host_memory, "thp_mode", lambda m=mode: m)
    assert host_memory.tunables_with_huge_pages({}) is None
  monkeypatch.setattr(host_memory, "thp_mode", lambda: "madvise")
  monkeypatch.setattr(host_memory.sys, "platform", "darwin")
  assert host_memory.tunables_with_huge_pages({}) is None
  monkeypatch.setattr(host_memory.sys, "platform", "linux")
  monkeypatch.setattr(host_memory, "cpu_backend", lambda environ: False)  # an accelerator host
  assert host_memory.tunables_with_huge_pages({}) is None


@pytest.mark.skipif(host_memory.thp_mode() != "madvise" or not sys.platform.startswith("linux"),
                    reason="needs Linux with transparent huge pages in madvise mode")
def test_reexec_sets_the_tunable_once():
  """A process that calls ensure_huge_pages runs again with the tunable (its first output, before
  the call, appears once: the re-exec happens once) and keeps its command line."""
  code = ("import os, sys; print('start', flush=True); from cqr_jax import host_memory; "
          "host_memory.ensure_huge_pages(); print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
  out = subprocess.run([sys.executable, "-c", code, "x", "--y"], env=env, capture_output=True,
                       text=True, check=True).stdout.split("\n")
  assert out[:2] == ["start", "start"]
  assert out[2] == "glibc.malloc.hugetlb=1 ['x', '--y']"
  out = subprocess.run([sys.executable, "-c", code], env={**env, "CQR_JAX_HUGE_PAGES": "0"},
                       capture_output=True, text=True, check=False)
  assert out.returncode != 0 and "KeyError: 'GLIBC_TUNABLES'" in out.stderr  # opted out
