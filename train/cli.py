"""`cqr-jax`: one command, one subcommand per stage (method.md 3-5), plus data and export tools.

Every stage subcommand takes the same config options (`--preset`, `--config`, `--set`) and a run
folder; a stage reads the previous stage's outputs from that folder and says which stage to run
when they are missing.
"""

from __future__ import annotations

import argparse
import logging
import sys

STAGES = {
    "pipeline": ("train.pipeline", "End to end: zero-shot eval -> SDPW -> SFT -> GRPO -> eval -> export."),
    "sdpw": ("train.sdpw", "Stage 1a: self-driven warm-up data (sample, keep rank-1 rewrites)."),
    "sft": ("train.sft", "Stage 1b: SFT on the self-distilled set."),
    "grpo": ("train.grpo", "Stage 2: GRPO with the rank-incentive reward."),
    "evaluate": ("train.evaluate", "Rewrite a split with a checkpoint, retrieve, score."),
    "export": ("train.export", "Export a checkpoint to a Hugging Face folder."),
    "rewrite": ("train.rewrite", "Rewrite one conversation (a quick look at a model)."),
    "data": ("train.data_cli", "Write the embedded benchmark; report raw/concat/oracle BM25 gaps."),
    "index": ("train.index", "Build the collection's BM25 (or --dense: dense) index once."),
}


def add_config_args(p: argparse.ArgumentParser, default_preset: str | None = None):
  from cqr_jax import config as cfglib
  g = p.add_argument_group("configuration (the run's config.yaml, else the preset; then YAML, "
                           "then --set)")
  g.add_argument("--preset", default=default_preset,
                 help=f"named preset; one of {sorted(cfglib.PRESETS)} (default: the run "
                 "folder's recorded config, else cpu-default)")
  g.add_argument("--config", default=None, help="YAML file with config sections")
  g.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                 help="override one field, e.g. --set grpo.lr=1e-6 (repeatable)")
  g.add_argument("--run-dir", default=None, help="run folder (default: runs/<preset name>)")
  g.add_argument("--print-config", action="store_true",
                 help="print the resolved values with a description each, and exit")
  g.add_argument("--distributed", action="store_true",
                 help="multi-host: call jax.distributed.initialize() first (TPU pods)")


def resolve_config(args):
  """The command's config (train/runfolder.py): the run's recorded one, else the preset."""
  from train import runfolder
  return runfolder.resolve(args.preset, args.config, args.set, args.run_dir)


def _fields_epilog(argv: list[str]) -> str:
  """The fields with the values of the preset named on the command line (else cpu-default)."""
  from cqr_jax import config as cfglib
  from train import runfolder
  preset = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--preset"), None)
  preset = preset if preset in cfglib.PRESETS else "cpu-default"
  return (f"config fields (values of preset {preset}; --print-config for a run's):\n"
          + runfolder.print_config(cfglib.resolve(preset)))


# Errors that are the user's to fix: one line, no traceback (--debug shows it).
_USER_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
                IsADirectoryError, UnicodeDecodeError)


def _quiet_closed_loop() -> None:
  """Drops the "Event loop is closed" traceback that Orbax's reader threads print after a
  failed restore (the failure itself is reported once, by the checkpoint code)."""
  default = sys.unraisablehook

  def hook(u):
    if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
      return
    default(u)
  if getattr(sys.unraisablehook, "__name__", "") != "hook":
    sys.unraisablehook = hook


def _raised_here(e: BaseException) -> bool:
  """A ValueError / RuntimeError raised by this project's own code (a message written for it)."""
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  f = tb.tb_frame.f_code.co_filename if tb is not None else ""
  return "site-packages" not in f and any(f"/{d}/" in f for d in ("train", "cqr_jax", "retrieval"))


def _is_project_error(e: BaseException) -> bool:
  if isinstance(e, (ValueError, RuntimeError)) and _raised_here(e):
    return True
  return isinstance(e, _USER_ERRORS) or any(
      c.__module__.split(".")[0] in ("cqr_jax", "train") for c in type(e).__mro__
      if issubclass(c, Exception) and c.__module__ != "builtins")


def _open_file(e: BaseException) -> str | None:
  """The text file being read where `e` was raised (the innermost frame holding one)."""
  import io
  frames, tb = [], e.__traceback__
  while tb is not None:
    frames.append(tb.tb_frame)
    tb = tb.tb_next
  for fr in reversed(frames):
    for v in fr.f_locals.values():
      if isinstance(v, io.TextIOWrapper) and isinstance(getattr(v, "name", None), str):
        line = fr.f_locals.get("lineno")
        return f"{v.name}:{line}" if isinstance(line, int) else v.name
  return None


def _one_line(e: BaseException) -> str:
  if isinstance(e, UnicodeDecodeError):
    return (f"{_open_file(e) or 'an input file'}: not UTF-8 text ({e.reason}, byte "
            f"{e.start} of a read block): re-save the file as UTF-8")
  if isinstance(e, OSError) and e.filename and e.strerror:
    return f"{e.filename}: {e.strerror}"
  msg = " ".join(str(e).split()) or type(e).__name__
  return msg if len(msg) <= 600 else msg[:600] + " ..."


def main(argv: list[str] | None = None) -> int:
  if argv is None:  # the process's own entry point (not a call from Python)
    from cqr_jax.host_memory import ensure_huge_pages
    ensure_huge_pages()
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(
      prog="cqr-jax", description="ConvSearch-R1 in JAX: conversational query rewriting with "
      "self-driven warm-up and rank-incentive GRPO.")
  sub = parser.add_subparsers(dest="stage", metavar="STAGE")
  for name, (_, helptext) in STAGES.items():
    sub.add_parser(name, help=helptext, add_help=False)
  if not argv or argv[0] in ("-h", "--help"):
    parser.print_help()
    return 0
  stage = argv[0]
  if stage not in STAGES:
    parser.error(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
  debug = "--debug" in argv
  argv = [a for a in argv if a != "--debug"]
  import importlib
  module = importlib.import_module(STAGES[stage][0])
  sp = argparse.ArgumentParser(prog=f"cqr-jax {stage}", description=STAGES[stage][1],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=_fields_epilog(argv) if getattr(module, "USES_CONFIG", True)
                               and any(a in ("-h", "--help") for a in argv) else None)
  module.add_args(sp)
  sp.add_argument("--debug", action="store_true", help="show the traceback of an error")
  args = sp.parse_args(argv[1:])
  args.stage_name = stage
  if not debug:
    _quiet_closed_loop()
  try:
    if getattr(args, "print_config", False):
      from train import runfolder
      print(runfolder.print_config(resolve_config(args)))
      return 0
    if getattr(args, "distributed", False):
      from cqr_jax import distributed
      distributed.initialize()
      with distributed.fail_fast():  # a crashed worker must not hang the others in a barrier
        return int(module.run(args) or 0)
    return int(module.run(args) or 0)
  except KeyboardInterrupt:
    if debug:
      raise
    _say(f"cqr-jax {stage}: interrupted. Run the same command again to resume: finished "
         "batches, steps and checkpoints in the run folder are kept.", logging.WARNING)
    return 130
  except Exception as e:  # noqa: BLE001 - one line for the user's errors; the rest propagate
    if debug or not _is_project_error(e):
      raise
    _say(f"cqr-jax {stage}: error: {_one_line(e)} (--debug shows the traceback)")
    return 2
  finally:
    from train import runfolder
    runfolder.close_log_file()


def _say(line: str, level: int = logging.ERROR) -> None:
  """`line` on stderr, and in the run's `logs/<stage>.log` when the command opened it."""
  from train import runfolder
  print(line, file=sys.stderr)
  runfolder.log_to_file(line, level)


if __name__ == "__main__":
  sys.exit(main())
