"""Metric sinks for the training loops (design.md "Runs on disk"): a JSONL file, TensorBoard
events and console lines; a collapse monitor (method.md 7.6), a phase timer, and curve plots.

Only process 0 writes (`enabled` defaults to `jax.process_index() == 0`); the others' calls are
no-ops, so every process can run the same code. The run folder may be a gs:// URI (issue 32):
files go through cqr_jax/paths.py (metrics.jsonl is rewritten per line there: objects cannot be
appended to) and tensorboardX writes gs:// itself (google-cloud-storage, pulled by gcsfs).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import time
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + "/"))
    else:
      out[key] = v
  return out


def _plain(v: Any) -> Any:
  """jax / numpy values -> Python floats, ints, bools or lists."""
  if isinstance(v, (bool, int, float, str)) or v is None:
    return v
  a = np.asarray(v)
  if a.ndim == 0:
    return a.item()
  return a.tolist()


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The records of a metrics.jsonl file; a malformed line raises naming the file and line."""
  from cqr_jax import paths
  rows = []
  with paths.open_file(path) as f:
    for i, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{i}: not a JSON line ({e})") from e
  return rows


def _summary_writer_cls():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX.writer imports torch at
  module level when it is installed (about 2 s and 300 MB in a JAX process) but needs it only for
  torch inputs, so `import torch` is made to fail during that import unless torch is loaded."""
  import sys
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this entry is None
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsLogger:
  """One JSON line per `log` call in `<run_dir>/metrics.jsonl`, scalars (and histograms of numeric
  lists) to TensorBoard under `<run_dir>/tb`, and a console summary of `console_keys`.

  resume_step: when resuming from a checkpoint, lines with a step above it (logged after the last
  checkpoint by the interrupted run) are dropped from metrics.jsonl first.
  """

  def __init__(self, run_dir: str | os.PathLike, enabled: bool | None = None,
               tensorboard: bool = True, console: bool = True, console_every: int = 1,
               console_keys: Sequence[str] | None = None, resume_step: int | None = None):
    if enabled is None:
      import jax
      enabled = jax.process_index() == 0
    self.enabled = enabled
    self.run_dir = os.fspath(run_dir)
    self.path = os.path.join(self.run_dir, "metrics.jsonl")
    self.console = console
    self.console_every = max(1, console_every)
    self.console_keys = list(console_keys) if console_keys else None
    self._file = self._tb = None
    if not enabled:
      return
    from cqr_jax import paths
    paths.makedirs(self.run_dir)
    if resume_step is not None and paths.exists(self.path):
      keep = [r for r in read_metrics(self.path) if r.get("step", -1) <= resume_step]
      paths.write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
    self._file = paths.open_append(self.path)
    if tensorboard:
      self._tb = _summary_writer_cls()(os.path.join(self.run_dir, "tb"))

  def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
    """Writes the metrics of `step` (nested dicts flatten to "a/b"); returns the flat record."""
    rec = {"step": int(step), "time": time.time()}
    rec.update({k: _plain(v) for k, v in _flatten(metrics).items()})
    if not self.enabled:
      return rec
    self._file.write(json.dumps(rec) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in rec.items():
        if k in ("step", "time"):
          continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, int(step))
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
          self._tb.add_histogram(k, np.asarray(v, np.float64), int(step))
    if self.console and int(step) % self.console_every == 0:
      self._print(rec)
    return rec

  def _print(self, rec: Mapping[str, Any]) -> None:
    keys = self.console_keys or [k for k, v in rec.items()
                                 if k not in ("step", "time") and isinstance(v, (int, float))]
    parts = [f"step {rec['step']}"]
    for k in keys:
      v = rec.get(k)
      if isinstance(v, float):
        parts.append(f"{k} {v:.4g}")
      elif v is not None:
        parts.append(f"{k} {v}")
    line = " | ".join(parts)
    try:
      from tqdm import tqdm
      tqdm.write(line)
    except ImportError:
      print(line, flush=True)

  def flush(self) -> None:
    if self._file:
      self._file.flush()
    if self._tb:
      self._tb.flush()

  def close(self) -> None:
    if self._file:
      self._file.close()
      self._file = None
    if self._tb:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class CollapseMonitor:
  """Warns on the GRPO collapse reported by others (method.md 7.6): format-pass rate falling, or
  the reward falling to 0, over a moving window of steps.

  A format warning fires when the window mean of the format-pass rate is `format_drop` (absolute)
  below the best window mean seen so far; a reward warning when the window mean reward is at or
  below `reward_floor` after having been above it. Each fires once, and re-arms on recovery.
  """

  def __init__(self, window: int = 20, format_drop: float = 0.2, reward_floor: float = 0.0):
    self.window = window
    self.format_drop = format_drop
    self.reward_floor = reward_floor
    self._fmt = collections.deque(maxlen=window)
    self._rew = collections.deque(maxlen=window)
    self._best_fmt = -math.inf
    self._reward_was_up = False
    self._fmt_fired = self._rew_fired = False

  def update(self, step: int, format_pass: float, reward_mean: float) -> list[str]:
    """Adds one step; returns (and emits via `warnings.warn`) the new warnings."""
    self._fmt.append(float(format_pass))
    self._rew.append(float(reward_mean))
    if len(self._fmt) < self.window:
      return []
    out = []
    fmt, rew = float(np.mean(self._fmt)), float(np.mean(self._rew))
    self._best_fmt = max(self._best_fmt, fmt)
    if fmt <= self._best_fmt - self.format_drop:
      if not self._fmt_fired:
        out.append(f"step {step}: format-pass rate over the last {self.window} steps fell to "
                   f"{fmt:.3f} from a best of {self._best_fmt:.3f} (possible collapse, "
                   "method.md 7.6)")
        self._fmt_fired = True
    else:
      self._fmt_fired = False
    if rew > self.reward_floor:
      self._reward_was_up, self._rew_fired = True, False
    elif self._reward_was_up and not self._rew_fired:
      out.append(f"step {step}: mean reward over the last {self.window} steps fell to {rew:.4f} "
                 f"(<= {self.reward_floor}; possible collapse, method.md 7.6)")
      self._rew_fired = True
    for msg in out:
      warnings.warn(msg, RuntimeWarning)
      log.warning(msg)
    return out


class Timer:
  """Wall-time split by phase: `with timer("rollout"): ...`; `split()` returns and resets the
  seconds per phase since the last split as {"time/<phase>": s, "time/total": s}.

  Device work is asynchronous: block on a phase's outputs inside its `with` (e.g.
  `jax.block_until_ready(out)`) so its time is not charged to the next phase.
  """

  def __init__(self):
    self._acc: dict[str, float] = collections.defaultdict(float)

  @contextlib.contextmanager
  def __call__(self, phase: str):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._acc[phase] += time.perf_counter() - t0

  def split(self) -> dict[str, float]:
    out = {f"time/{k}": v for k, v in self._acc.items()}
    out["time/total"] = sum(self._acc.values())
    self._acc = collections.defaultdict(float)
    return out


def plot_curves(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike,
                keys: Iterable[str], title: str | None = None) -> str:
  """One panel per key (value against step) from a metrics.jsonl file, saved as a PNG.

  Uses matplotlib's Agg canvas directly (no global backend change). A key absent from every
  record raises a KeyError naming it and the file.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  rows = read_metrics(metrics_jsonl)
  keys = list(keys)
  series = {}
  for k in keys:
    pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
    if not pts:
      raise KeyError(f"plot_curves: no numeric {k!r} in {metrics_jsonl} "
                     f"(keys there: {sorted({x for r in rows for x in r})[:40]})")
    series[k] = np.asarray(pts, np.float64)
  fig = Figure(figsize=(4.0 * len(keys), 3.2), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(keys), squeeze=False)[0]
  for ax, k in zip(axes, keys):
    ax.plot(series[k][:, 0], series[k][:, 1], lw=1.2)
    ax.set_title(k)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  from cqr_jax import paths
  out = os.fspath(out_png)
  paths.makedirs(os.path.dirname(paths.absolute(out)))
  with paths.open_file(out, "wb") as f:
    fig.savefig(f, format="png", dpi=110)
  return out
