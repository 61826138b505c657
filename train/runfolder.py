"""The run folder is the record (issue 36): its config is written once and checked by every later
command, its logs go to `<run>/logs/<stage>.log`, and outputs are not overwritten silently. The
folder is a local path or a gs:// URI (cqr_jax/paths.py; issue 32).

A later command starts from `<run>/config.yaml`; a `--preset`, `--config` or `--set` that changes
a field that outputs already in the folder depend on is refused, naming the field. Fields no
output depends on (`FREE`: the eval section, the mesh, the run's name and folder, the BM25
index's location and its workers) may differ.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from cqr_jax import config as cfglib
from cqr_jax import configlib, paths

CONFIG_FILE = "config.yaml"
FREE = ("eval.", "mesh.", "run_dir", "name", "data.test_split", "data.max_test_turns",
        "retrieval.bm25_index", "retrieval.rank_workers",
        "retrieval.dense_index")  # (an index is checked against the run)
TRAINING = ("sdpw", "sft", "grpo")  # a section's outputs feed every later stage and eval
OUTPUTS = TRAINING + ("eval", "export")

# Descriptions of the fields whose source carries no comment (`--print-config`, `--help`).
DOCS = {
    "name": "the run's name (default run folder: runs/<name>)",
    "run_dir": "the run folder: config.yaml, one sub-folder per stage, logs/",
    "seed": "seed of the initial weights of a random:<preset> model",
    "model.remat": "activation recompute in the update: full | none | dots_with_no_batch_dims_saveable",
    "mesh.data": "data-parallel axis size", "mesh.tensor": "tensor-parallel axis size",
    "data.seed": "synthetic only: generator seed",
    "data.train_split": "split SDPW, SFT and GRPO train on",
    "data.test_split": "split evaluation scores (must differ from train_split)",
    "data.max_test_turns": "0 = all; a cap is logged",
    "retrieval.b": "BM25 b", "retrieval.top_k": "passages retrieved per query",
    "retrieval.reward_max_words": "query words kept at reward / SDPW time",
    "retrieval.eval_max_words": "query words kept at evaluation",
    "retrieval.dense_pooling": "dense encoder pooling",
    "rollout.max_prompt_len": "prompt tokens (GRPO drops longer prompts, logged)",
    "rollout.max_new_tokens": "response tokens sampled in GRPO",
    "rollout.temperature": "GRPO sampling temperature", "rollout.top_p": "nucleus sampling",
    "rollout.top_k": "0 = no top-k", "rollout.truncate_prompt_left": "cut long prompts on the left",
    "sdpw.samples_per_turn": "samples drawn per training turn",
    "sdpw.temperature": "SDPW sampling temperature", "sdpw.max_new_tokens": "response tokens",
    "sdpw.rank_threshold": "keep a rewrite whose gold passage ranks at most this",
    "sdpw.few_shot": "sample with the few-shot prompt (method.md 2.5)",
    "sdpw.batch_prompts": "turns per sampling batch (the unit of resume)",
    "sdpw.seed": "PRNG seed of the samples", "sft.lr": "peak learning rate",
    "sft.epochs": "passes over the self-distilled set", "sft.batch_size": "examples per step",
    "sft.micro_batch": "examples per compute micro-batch", "sft.max_len": "tokens per example",
    "sft.warmup_ratio": "linear warm-up fraction", "sft.b1": "AdamW beta1", "sft.b2": "AdamW beta2",
    "sft.weight_decay": "AdamW weight decay", "sft.clip_norm": "gradient clip norm",
    "sft.seed": "shuffle seed", "grpo.epochs": "passes over the training turns (grpo.steps=0)",
    "grpo.batch_prompts": "prompts per step", "grpo.lr": "peak learning rate",
    "grpo.warmup_steps": "linear warm-up steps", "grpo.b1": "AdamW beta1",
    "grpo.b2": "AdamW beta2", "grpo.weight_decay": "AdamW weight decay",
    "grpo.clip_norm": "gradient clip norm", "grpo.max_turns": "with turns=sdpw_kept: the first N",
    "grpo.save_every": "checkpoint every N steps", "grpo.keep_checkpoints": "newest N kept",
    "grpo.seed": "PRNG and batch-order seed", "grpo.log_samples": "samples logged per step",
    "eval.greedy": "greedy decoding instead of sampling", "eval.temperature": "sampling temperature",
    "eval.seeds": "one sampled run per seed", "eval.max_new_tokens": "response tokens",
    "eval.batch_prompts": "turns per sampling batch",
    "eval.baselines": "also score raw / concatenated questions",
    "eval.bootstrap_seed": "seed of the paired bootstrap",
    "grpo.loss.policy_loss": "policy objective (ppo_clip: the paper)",
    "grpo.loss.clip_eps": "ratio clipped to [1 - clip_eps, 1 + clip_eps_high]",
    "grpo.loss.clip_eps_high": "upper clip (null = clip_eps)",
    "grpo.loss.kl_coef": "weight of the KL term to the reference (0: no reference pass)",
    "grpo.loss.entropy_coef": "entropy bonus weight",
    "grpo.loss.aggregation": "how token losses are averaged (token_mean: verl's default)",
    "grpo.reward.kind": "rirs: the rank-incentive reward (method.md 4.1)",
    "grpo.reward.format_penalty": "reward of a response that fails the format check",
    "grpo.reward.top_k": "ranks below this count as not found",
    "grpo.reward.curriculum_fraction": "curriculum rewards: fraction of the steps",
    "grpo.reward.curriculum_not_found": "curriculum rewards: reward when not found",
}


class RunFolderError(configlib.ConfigError):
  """The run folder disagrees with the command (a changed field, an output in the way)."""


def flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in (configlib.to_dict(cfg) if not isinstance(cfg, dict) else cfg).items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def written(run_dir: str) -> list[str]:
  """The stages with outputs in the run folder."""
  return [s for s in OUTPUTS if paths.nonempty_dir(os.path.join(run_dir, s))]


def conflicts(recorded: cfglib.RunConfig, cfg: cfglib.RunConfig, run_dir: str
              ) -> list[tuple[str, Any, Any, list[str]]]:
  """(field, recorded value, new value, stages whose outputs depend on it) per refused change."""
  a, b, done = flat(recorded), flat(cfg), written(run_dir)
  out = []
  for k in b:
    if a.get(k) == b[k] or k.startswith(FREE):
      continue
    sec = k.split(".")[0]
    later = TRAINING[TRAINING.index(sec):] if sec in TRAINING else OUTPUTS
    deps = [s for s in done if s in later or (s == "eval" and sec in TRAINING)]
    if deps:
      out.append((k, a.get(k), b[k], deps))
  return out


def load_recorded(run_dir: str) -> cfglib.RunConfig | None:
  path = os.path.join(run_dir, CONFIG_FILE)
  if not paths.exists(path):
    return None
  try:
    return configlib.merge(cfglib.RunConfig(), configlib.load_yaml(path))
  except configlib.ConfigError as e:
    raise RunFolderError(f"{path}: {e}") from None


def check(cfg: cfglib.RunConfig) -> cfglib.RunConfig | None:
  """Refuses `cfg` when it changes a field the run folder's outputs depend on; returns the
  recorded config (None for a new folder)."""
  recorded = load_recorded(cfg.run_dir)
  if recorded is None:
    return None
  bad = conflicts(recorded, cfg, cfg.run_dir)
  if bad:
    what = "; ".join(f"{k}={new!r} (recorded {old!r}, used by {'/'.join(d)})"
                     for k, old, new, d in bad[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    raise RunFolderError(
        f"{os.path.join(cfg.run_dir, CONFIG_FILE)}: {what}{more}: the run's outputs were made "
        "with the recorded values; drop that --preset/--config/--set, or use a new --run-dir")
  return recorded


def record(cfg: cfglib.RunConfig, main: bool = True) -> None:
  """Writes `<run>/config.yaml` for a new run; for an existing one, checks `cfg` against it and
  records changed fields that no output depends on yet (e.g. grpo.* before GRPO ran)."""
  recorded = check(cfg)
  if not main:
    return
  path = os.path.join(cfg.run_dir, CONFIG_FILE)
  if recorded is not None:
    changed = [k for k, v in flat(cfg).items()
               if flat(recorded).get(k) != v and not k.startswith(FREE)]
    if not changed:
      return
    logging.getLogger("cqr_jax").info("%s: recording %s (no output depends on them yet)", path,
                                      ", ".join(changed[:6]))
  try:
    paths.write_text(path, configlib.to_yaml(cfg))
  except OSError as e:
    raise RunFolderError(f"--run-dir {cfg.run_dir}: cannot write {CONFIG_FILE} ({e.strerror}): "
                         "choose a folder you can write to") from None


def resolve(preset: str | None, yaml_path: str | None, overrides: list[str],
            run_dir: str | None) -> cfglib.RunConfig:
  """The command's config: the run folder's recorded one when it exists, else `preset`
  (default cpu-default); then the preset, YAML and `--set` on top; refused on a conflict."""
  fresh = cfglib.resolve(preset or "cpu-default", yaml_path, overrides)
  base_dir = run_dir or fresh.run_dir
  recorded = load_recorded(base_dir)
  if recorded is None:
    cfg = fresh
  else:
    cfg = recorded
    if preset:
      if preset not in cfglib.PRESETS:
        raise configlib.ConfigError(f"unknown preset {preset!r}; known: {sorted(cfglib.PRESETS)}")
      cfg = configlib.merge(cfg, cfglib.PRESETS[preset]())
    if yaml_path:
      cfg = configlib.merge(cfg, configlib.load_yaml(yaml_path))
    cfg = configlib.merge(cfg, configlib.parse_overrides(overrides))
  cfg = configlib.merge(cfg, {"run_dir": base_dir})
  check(cfg)
  return cfg


def guard_output(path: str, overwrite: bool, what: str, hint: str = "") -> None:
  """Refuses to replace an existing output folder or file unless `overwrite`."""
  if paths.exists(path) and (not paths.isdir(path) or paths.listdir(path)) and not overwrite:
    raise RunFolderError(f"{path} holds {what} already: pass --overwrite to replace it{hint}")


def print_config(cfg: cfglib.RunConfig) -> str:
  """The resolved values, each with a one-line description."""
  return "\n".join(configlib.field_help(cfg, extra=DOCS))


# ---------------------------------------------------------------------------------- logging

class _TqdmHandler(logging.StreamHandler):
  """Writes through tqdm, so a log line does not land on a progress bar."""

  def emit(self, record):
    try:
      from tqdm.auto import tqdm
      tqdm.write(self.format(record), file=self.stream)
    except Exception:  # noqa: BLE001 - logging must not raise
      self.handleError(record)


def setup_logging(run_dir: str | None = None, stage: str | None = None) -> None:
  """The project's INFO lines on the console whatever absl/orbax set up first (their own
  logger, not the root's), warnings routed through it, and a copy in `<run>/logs/<stage>.log`."""
  import sys
  fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
  loggers = [logging.getLogger("cqr_jax"), logging.getLogger("py.warnings")]
  for lg in loggers:
    for h in list(lg.handlers):
      if getattr(h, "_cqr_jax", False):
        lg.removeHandler(h)
        h.close()
  handlers = [_TqdmHandler(sys.stderr)]
  # An object store cannot append: with a gs:// run folder the console is the log
  # (tpu_scripts/launch.sh keeps one per worker).
  if run_dir and stage and not paths.is_uri(run_dir):
    try:
      os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
      handlers.append(logging.FileHandler(os.path.join(run_dir, "logs", f"{stage}.log"),
                                          encoding="utf-8"))
    except OSError:
      pass  # an unwritable run folder is reported by the command itself
  for h in handlers:
    h.setFormatter(fmt)
    h._cqr_jax = True
  for lg in loggers:
    lg.setLevel(logging.INFO)
    lg.propagate = False
    for h in handlers:
      lg.addHandler(h)
  logging.captureWarnings(True)  # one line each, without the source line
  import warnings
  warnings.formatwarning = lambda msg, cat, *_a, **_k: f"{cat.__name__}: {msg}"
  for noisy in ("absl", "orbax", "jax._src", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def _log_files() -> list[logging.FileHandler]:
  return [h for h in logging.getLogger("cqr_jax").handlers
          if getattr(h, "_cqr_jax", False) and isinstance(h, logging.FileHandler)]


def log_to_file(line: str, level: int = logging.ERROR) -> None:
  """Copies a line the CLI printed itself (its one-line error) into `<run>/logs/<stage>.log`
  when that file is open (not to the console, which has it already)."""
  record = logging.LogRecord("cqr_jax", level, __file__, 0, line, None, None)
  for h in _log_files():
    h.handle(record)


def close_log_file() -> None:
  """Detaches and closes `<run>/logs/<stage>.log` (the command is over: a later command in the
  same process must not write into this run's log)."""
  for h in _log_files():
    for lg in (logging.getLogger("cqr_jax"), logging.getLogger("py.warnings")):
      lg.removeHandler(h)
    h.close()


def fault(point: str, batch: int | None, f, text: str) -> None:
  """Crash test hook: with CQR_JAX_FAULT=<point>:<batch> (e.g. sdpw_done:1) the process writes
  half of `text` to `f` and kills itself with SIGKILL, as a crash mid-write leaves the file."""
  spec = os.environ.get("CQR_JAX_FAULT")
  if not spec or spec != f"{point}:{batch}":
    return
  import signal
  f.write(text[:len(text) // 2])
  f.flush()
  os.fsync(f.fileno())
  os.kill(os.getpid(), signal.SIGKILL)
