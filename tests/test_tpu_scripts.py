"""tpu_scripts/*.sh: --help, and the exact gcloud commands of --dry-run (no gcloud needed)."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["create", "setup", "data", "launch", "logs", "status", "stop", "teardown"]
SLICE = ["--dry-run", "--name", "cqr-v5e", "--zone", "us-east5-a", "--project", "my-proj"]
GFLAGS = ["--zone=us-east5-a", "--project=my-proj"]


def _run(script: str, *args: str, check: bool = True, env: dict | None = None,
         path: str = "/usr/bin:/bin"):
  clean = {k: v for k, v in os.environ.items() if not k.startswith("CQR_TPU_")}
  clean.update(env or {})
  clean["PATH"] = path  # by default no gcloud: a dry run must not need it
  out = subprocess.run(["bash", os.path.join(ROOT, "tpu_scripts", f"{script}.sh"), *args],
                       capture_output=True, text=True, env=clean, timeout=30)
  if check:
    assert out.returncode == 0, out.stderr
  return out


def _commands(stdout: str) -> list[list[str]]:
  """The dry run's command lines (comments dropped), each split back into argv."""
  return [shlex.split(line) for line in stdout.splitlines()
          if line.strip() and not line.startswith("#")]


def _remote(argv: list[str]) -> str:
  return argv[argv.index("--command") + 1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  out = _run(script, "--help")
  assert out.stdout.startswith(f"Usage: tpu_scripts/{script}.sh")
  assert "--dry-run" in out.stdout and "--accelerator-type" in out.stdout


def test_create_queued_spot_multi_host():
  out = _run("create", *SLICE, "--accelerator-type", "v5litepod-16", "--queued", "--spot",
             "--valid-until-duration=6h", "--wait")
  cmds = _commands(out.stdout)
  assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "cqr-v5e",
                     "--node-id=cqr-v5e", "--runtime-version=v2-alpha-tpuv5-lite", *GFLAGS,
                     "--accelerator-type=v5litepod-16", "--spot", "--valid-until-duration=6h"]
  assert cmds[1] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "cqr-v5e",
                     *GFLAGS, "--format=value(state.state)"]
  assert "4 host(s)" in out.stdout


def test_create_direct_single_host():
  out = _run("create", *SLICE, "--accelerator-type", "v4-8", "--", "--network=my-net")
  assert _commands(out.stdout) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "cqr-v5e",
      "--version=tpu-ubuntu2204-base", *GFLAGS, "--accelerator-type=v4-8", "--network=my-net"]]
  assert "1 host(s)" in out.stdout


@pytest.mark.parametrize("accel,hosts,runtime", [
    ("v4-8", 1, "tpu-ubuntu2204-base"), ("v4-32", 4, "tpu-ubuntu2204-base"),
    ("v5p-8", 1, "v2-alpha-tpuv5"), ("v5p-32", 4, "v2-alpha-tpuv5"),
    ("v5litepod-8", 1, "v2-alpha-tpuv5-lite"), ("v5litepod-16", 4, "v2-alpha-tpuv5-lite"),
    ("v5litepod-64", 16, "v2-alpha-tpuv5-lite"), ("v6e-16", 4, "v2-alpha-tpuv6e")])
def test_hosts_and_runtime_per_type(accel, hosts, runtime):
  out = _run("create", *SLICE, "--accelerator-type", accel)
  assert f"{hosts} host(s), runtime {runtime}" in out.stdout


def test_launch_multi_host_targets_every_worker_with_a_log_each():
  out = _run("launch", *SLICE, "--accelerator-type", "v4-32", "--run-name", "grpo-qwen3b",
             "--env", "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true",
             "grpo", "--preset", "qwen2.5-3b-topiocqa-bm25", "--run-dir",
             "gs://bucket/runs/grpo-qwen3b", "--set", "grpo.lr=1e-6")
  (cmd,) = _commands(out.stdout)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "cqr-v5e"]
  assert "--worker=all" in cmd and all(g in cmd for g in GFLAGS)
  remote = _remote(cmd)
  # The remote command line is itself valid shell; find the cqr-jax invocation in it.
  words = shlex.split(remote)
  start = words.index(".venv/bin/cqr-jax")
  assert words[start:start + 9] == [
      ".venv/bin/cqr-jax", "grpo", "--preset", "qwen2.5-3b-topiocqa-bm25", "--run-dir",
      "gs://bucket/runs/grpo-qwen3b", "--set", "grpo.lr=1e-6", "--distributed"]
  assert "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true" in words
  assert "agent-worker-number" in remote  # each worker knows its index
  assert "> $HOME/cqr-logs/grpo-qwen3b/worker-$W.log 2>&1" in remote
  assert "nohup setsid" in remote and "worker-$W.pid" in remote
  assert "4 host(s)" in out.stdout
  # The remote command parses as bash.
  subprocess.run(["bash", "-n", "-c", remote], check=True)


def test_launch_foreground_and_no_distributed():
  out = _run("launch", *SLICE, "--run-name", "dbg", "--foreground", "--no-distributed",
             "evaluate", "--run-dir", "gs://b/r")
  remote = _remote(_commands(out.stdout)[0])
  assert "nohup" not in remote and "exit $code" in remote
  assert "--distributed" not in remote
  subprocess.run(["bash", "-n", "-c", remote], check=True)


def test_launch_export_clears_a_stale_tpu_holder_and_passes_distributed():
  """`launch.sh export` appends --distributed, which `cqr-jax export` accepts (every worker
  takes part in reading the checkpoint); before the run, each worker kills what holds its TPU
  and removes libtpu's lockfile."""
  import argparse

  from train import export
  out = _run("launch", *SLICE, "--accelerator-type", "v5p-32", "--run-name", "ex",
             "export", "--run-dir", "gs://b/r", "--stage", "sft", "--dtype", "bfloat16")
  remote = _remote(_commands(out.stdout)[0])
  words = shlex.split(remote)
  start = words.index(".venv/bin/cqr-jax")
  assert words[start + 1] == "export" and words[-1 - words[::-1].index("--distributed")]
  p = argparse.ArgumentParser()
  export.add_args(p)
  args = p.parse_args(words[start + 2:words.index(">", start)])
  assert (args.run_dir, args.stage, args.dtype, args.distributed) == (
      "gs://b/r", "sft", "bfloat16", True)
  clear = remote.index("rm -f /tmp/libtpu_lockfile")
  assert "lsof -t /dev/accel* /dev/vfio/*" in remote and "kill -9" in remote
  assert remote.index("agent-worker-number") < clear < remote.index(".venv/bin/cqr-jax")
  subprocess.run(["bash", "-n", "-c", remote], check=True)
  kept = _remote(_commands(_run("launch", *SLICE, "--run-name", "ex", "--no-clear-tpu", "export",
                                "--run-dir", "gs://b/r").stdout)[0])
  assert "libtpu_lockfile" not in kept and "--distributed" in kept


def test_clear_tpu_snippet_kills_only_what_holds_the_tpu(tmp_path):
  """The snippet run here with stand-ins for sudo and lsof: it kills the pids lsof names and
  removes the lockfile (the stand-in sudo records `kill` and `rm` instead of running them)."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  log = tmp_path / "calls"
  for name, body in (("sudo", f'case $1 in kill | rm) echo "$*" >> {log} ;; *) "$@" ;; esac'),
                     ("lsof", "echo 4242; echo 4343")):
    (bindir / name).write_text(f"#!/bin/bash\n{body}\n")
    (bindir / name).chmod(0o755)
  show = f'source {ROOT}/tpu_scripts/common.sh; printf %s "$CLEAR_TPU_SNIPPET"'
  snippet = subprocess.run(["bash", "-c", show], capture_output=True, text=True,
                           check=True).stdout
  out = subprocess.run(["bash", "-c", f"W=0; {snippet}"], capture_output=True, text=True,
                       env={"PATH": f"{bindir}:/usr/bin:/bin"}, check=True)
  assert log.read_text().splitlines() == ["kill -9 4242", "kill -9 4343",
                                          "rm -f /tmp/libtpu_lockfile"]
  assert "[worker 0] stopping pid 4242" in out.stdout


@pytest.mark.parametrize("script", SCRIPTS + ["common"])
def test_scripts_parse(script):
  subprocess.run(["bash", "-n", os.path.join(ROOT, "tpu_scripts", f"{script}.sh")], check=True)


def test_logs_fetches_one_file_per_worker():
  out = _run("logs", *SLICE, "--accelerator-type", "v5p-32", "--run-name", "r1", "--out", "L")
  cmds = _commands(out.stdout)
  assert cmds[0] == ["mkdir", "-p", "L/r1"]
  assert cmds[1:] == [
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", f"cqr-v5e:cqr-logs/r1/worker-{w}.log",
       f"L/r1/worker-{w}.log", *GFLAGS, f"--worker={w}"] for w in range(4)]


def test_logs_tail_and_num_workers_override():
  out = _run("logs", *SLICE, "--run-name", "r1", "--tail", "7")
  (cmd,) = _commands(out.stdout)
  assert "--worker=all" in cmd and "tail -n 7 $HOME/cqr-logs/r1/worker-$W.log" in _remote(cmd)
  out = _run("logs", *SLICE, "--run-name", "r1", "--num-workers", "2")
  assert len(_commands(out.stdout)) == 3


def test_setup_copies_and_installs_on_every_worker():
  out = _run("setup", *SLICE, "--check")
  cmds = _commands(out.stdout)
  assert cmds[0][:2] == ["git", "-C"]  # pack the checkout (a pipeline; printed, not run)
  assert cmds[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert cmds[1][5].endswith("/cqr-jax-src-cqr-v5e.tar.gz")
  assert cmds[1][6:] == ["cqr-v5e:cqr-jax-src.tar.gz", *GFLAGS, "--worker=all"]
  ssh = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  assert len(ssh) == 3 and all("--worker=all" in c for c in ssh)
  assert "uv pip install --python .venv/bin/python -e '.[tpu]'" in _remote(ssh[1])
  assert "distributed.initialize()" in _remote(ssh[2])
  for c in ssh:
    subprocess.run(["bash", "-n", "-c", _remote(c)], check=True)


def test_setup_from_git():
  out = _run("setup", *SLICE, "--git", "https://example.com/cqr-jax.git", "--ref", "v1", "--iap")
  cmds = _commands(out.stdout)
  assert all("--tunnel-through-iap" in c for c in cmds)
  assert "git clone https://example.com/cqr-jax.git $HOME/cqr-jax" in _remote(cmds[0])


def test_data_commands():
  cmds = _commands(_run("data", *SLICE, "copy", "gs://b/index", "data/index").stdout)
  assert "gcloud storage cp --recursive gs://b/index data/index" in _remote(cmds[0])
  assert "--worker=all" in cmds[0]
  cmds = _commands(_run("data", *SLICE, "mount", "gs://b", "mnt/b").stdout)
  # Orbax finishes a checkpoint by renaming its folder: gcsfuse must allow directory renames.
  assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 b mnt/b" in _remote(cmds[0])
  subprocess.run(["bash", "-n", "-c", _remote(cmds[0])], check=True)
  cmds = _commands(_run("data", "--dry-run", "upload", "local/x", "gs://b/x").stdout)
  assert cmds == [["gcloud", "storage", "cp", "--recursive", "local/x", "gs://b/x"]]


def test_status_stop_teardown():
  cmds = _commands(_run("status", *SLICE, "--queued", "--run-name", "r1").stdout)
  assert cmds[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "cqr-v5e"]
  assert cmds[1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "cqr-v5e"]
  assert "--worker=all" in cmds[2]
  cmds = _commands(_run("stop", *SLICE, "--run-name", "r1").stdout)
  assert "--worker=all" in cmds[0] and "kill -TERM -- -$P" in _remote(cmds[0])
  cmds = _commands(_run("teardown", *SLICE).stdout)
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "cqr-v5e", *GFLAGS,
                   "--quiet"]]
  cmds = _commands(_run("teardown", *SLICE, "--queued", "--accelerator-type", "v4-16",
                        "--fetch-logs", "r1", "--async").stdout)
  assert [c[4] for c in cmds[1:3]] == ["scp", "scp"]  # 2 hosts: a log each, then delete
  assert cmds[-1] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "cqr-v5e",
                      *GFLAGS, "--force", "--quiet", "--async"]


def test_settings_from_environment():
  env = {"CQR_TPU_NAME": "envslice", "CQR_TPU_ZONE": "europe-west4-a", "CQR_TPU_DRY_RUN": "1",
         "CQR_TPU_TYPE": "v5p-8"}
  cmds = _commands(_run("create", env=env).stdout)
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "envslice",
                   "--version=v2-alpha-tpuv5", "--zone=europe-west4-a",
                   "--accelerator-type=v5p-8"]]


@pytest.mark.parametrize("script,args,message", [
    ("create", ["--dry-run", "--zone", "z"], "--name"),
    ("create", ["--dry-run", "--name", "x"], "--zone"),
    ("create", SLICE + ["--bogus"], "unknown option '--bogus'"),
    ("create", SLICE + ["--accelerator-type", "tpu9-8"], "unknown accelerator type"),
    ("create", SLICE + ["--valid-until-duration", "1h"], "needs --queued"),
    ("create", ["--dry-run", "--zone", "z", "--name", "Bad_Name"], "lowercase"),
    ("launch", SLICE, "missing STAGE"),
    ("launch", SLICE + ["--env", "oops", "sft"], "KEY=VALUE"),
    ("logs", SLICE, "--run-name is required"),
    ("data", SLICE + ["copy", "/local", "x"], "must be a gs:// path"),
    ("stop", SLICE + ["--run-name"], "needs a value"),
])
def test_bad_arguments_fail_with_a_message(script, args, message):
  out = _run(script, *args, check=False)
  assert out.returncode == 2 and message in out.stderr, out.stderr


FAKE_GCLOUD = """#!/bin/bash
# Stands in for gcloud: records each call (one JSON argv per line) and answers describe calls.
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$GCLOUD_CALLS"
case "$*" in
  *"tpu-vm describe"*networkEndpoints*) echo "10.0.0.2;10.0.0.3;10.0.0.4" ;;
  *"queued-resources describe"*) echo ACTIVE ;;
esac
"""


def test_real_mode_calls_gcloud_and_asks_it_for_the_workers(tmp_path):
  """Without --dry-run the scripts run gcloud (a recording stand-in here) with the same argv."""
  import json

  bindir = tmp_path / "bin"
  bindir.mkdir()
  (bindir / "gcloud").write_text(FAKE_GCLOUD)
  (bindir / "gcloud").chmod(0o755)
  calls = tmp_path / "calls.jsonl"
  env = {"GCLOUD_CALLS": str(calls)}
  path = f"{bindir}:/usr/bin:/bin"
  real = [a for a in SLICE if a != "--dry-run"]
  _run("create", *real, "--queued", "--wait", env=env, path=path)
  _run("logs", *real, "--run-name", "r1", "--out", str(tmp_path / "L"), env=env, path=path)
  out = _run("launch", *real, "--run-name", "r1", "sft", "--run-dir", "gs://b/r", env=env,
             path=path)
  argvs = [json.loads(line) for line in calls.read_text().splitlines()]
  assert argvs[0][:3] == ["compute", "tpus", "queued-resources"] and argvs[0][3] == "create"
  assert argvs[1][3] == "describe" and "--format=value(state.state)" in argvs[1]
  assert argvs[2][:4] == ["compute", "tpus", "tpu-vm", "describe"]  # how many workers?
  scps = [a for a in argvs if a[3] == "scp"]
  assert [a[-1] for a in scps] == ["--worker=0", "--worker=1", "--worker=2"]
  assert (tmp_path / "L" / "r1").is_dir()
  ssh = argvs[-1]
  assert ssh[3] == "ssh" and "--worker=all" in ssh and "--distributed" in ssh[-1]
  assert "3 host(s)" in out.stderr  # progress goes to stderr, commands echoed with '+ '
  assert "+ gcloud compute tpus tpu-vm ssh" in out.stderr
