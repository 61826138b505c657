"""Metric sinks: JSONL records, TensorBoard events (read back with tensorboard's reader through
tensorboardX's protobufs), console lines, the collapse monitor, the timer and the plot."""

import json
import time

import jax.numpy as jnp
import numpy as np
import pytest

from cqr_jax.metrics_log import CollapseMonitor, MetricsLogger, Timer, plot_curves, read_metrics


def _tb_scalars(tb_dir):
  from tensorboardX.proto import event_pb2
  import struct
  out = {}
  for f in tb_dir.iterdir():
    data = f.read_bytes()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in ev.summary.value:
        if v.HasField("simple_value"):
          out.setdefault(v.tag, []).append((ev.step, v.simple_value))
  return out


def test_logger_writes_jsonl_tensorboard_and_console(tmp_path, capsys):
  with MetricsLogger(tmp_path, enabled=True, console_keys=["reward/mean", "kl"]) as ml:
    for step in range(3):
      ml.log(step, {"reward": {"mean": jnp.float32(0.5 * step)}, "kl": np.float64(1e-3),
                    "ranks": [1, 5, 100], "note": "x", "loss": float("nan")})
  rows = read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [0, 1, 2]
  assert rows[2]["reward/mean"] == 1.0 and rows[1]["ranks"] == [1, 5, 100]
  assert np.isnan(rows[0]["loss"])
  tb = _tb_scalars(tmp_path / "tb")
  assert tb["reward/mean"] == [(0, 0.0), (1, 0.5), (2, 1.0)]
  out = capsys.readouterr().out
  assert "step 2 | reward/mean 1 | kl 0.001" in out


def test_disabled_logger_writes_nothing_and_resume_truncates(tmp_path):
  MetricsLogger(tmp_path / "off", enabled=False).log(0, {"a": 1})
  assert not (tmp_path / "off").exists()
  with MetricsLogger(tmp_path, enabled=True, tensorboard=False, console=False) as ml:
    for s in range(6):
      ml.log(s, {"a": s})
  with MetricsLogger(tmp_path, enabled=True, tensorboard=False, console=False,
                     resume_step=3) as ml:
    ml.log(4, {"a": 40})
  assert [(r["step"], r["a"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
      (0, 0), (1, 1), (2, 2), (3, 3), (4, 40)]
  (tmp_path / "bad.jsonl").write_text('{"step": 0}\nnot json\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON line"):
    read_metrics(tmp_path / "bad.jsonl")


def test_collapse_monitor():
  m = CollapseMonitor(window=5, format_drop=0.2)
  msgs = []
  with pytest.warns(RuntimeWarning):
    for step in range(40):
      if step < 15:
        fmt, rew = 0.95, 1.2
      elif step < 30:  # collapse: gibberish fails the format check, reward -> 0 / negative
        fmt, rew = 0.3, -0.05
      else:  # recovery
        fmt, rew = 0.95, 1.0
      msgs += m.update(step, fmt, rew)
  assert len(msgs) == 2  # each fires once during the collapse
  assert any("format-pass rate" in s for s in msgs) and any("mean reward" in s for s in msgs)
  quiet = CollapseMonitor(window=5)
  assert sum(len(quiet.update(s, 0.9 + 0.01 * (s % 3), 0.8)) for s in range(30)) == 0


def test_timer_splits():
  t = Timer()
  with t("rollout"):
    time.sleep(0.02)
  with t("update"):
    pass
  with t("rollout"):
    pass
  s = t.split()
  assert set(s) == {"time/rollout", "time/update", "time/total"}
  assert s["time/rollout"] >= 0.02 and s["time/total"] == pytest.approx(
      s["time/rollout"] + s["time/update"])
  assert t.split() == {"time/total": 0}


def test_plot_curves(tmp_path):
  p = tmp_path / "metrics.jsonl"
  p.write_text("".join(json.dumps({"step": s, "reward/mean": s * 0.1, "format_pass": 0.9}) + "\n"
                       for s in range(10)))
  out = plot_curves(p, tmp_path / "plots" / "curves.png", ["reward/mean", "format_pass"])
  assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(KeyError, match="no numeric 'mrr'"):
    plot_curves(p, tmp_path / "x.png", ["mrr"])
