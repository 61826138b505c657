"""`cqr-jax`: one command, one subcommand per stage (method.md 3-5), plus data and export tools.

Every stage subcommand takes the same config options (`--preset`, `--config`, `--set`) and a run
folder; a stage reads the previous stage's outputs from that folder and says which stage to run
when they are missing.
"""

from __future__ import annotations

import argparse
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
}


def add_config_args(p: argparse.ArgumentParser, default_preset: str | None = "cpu-default"):
  from cqr_jax import config as cfglib
  g = p.add_argument_group("configuration (preset, then YAML, then --set)")
  g.add_argument("--preset", default=default_preset,
                 help=f"named preset; one of {sorted(cfglib.PRESETS)} (default: %(default)s)")
  g.add_argument("--config", default=None, help="YAML file with config sections")
  g.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                 help="override one field, e.g. --set grpo.lr=1e-6 (repeatable)")
  g.add_argument("--run-dir", default=None, help="run folder (default: runs/<preset name>)")
  g.add_argument("--distributed", action="store_true",
                 help="multi-host: call jax.distributed.initialize() first (TPU pods)")


def resolve_config(args):
  from cqr_jax import config as cfglib
  cfg = cfglib.resolve(args.preset, args.config, args.set)
  if args.run_dir:
    cfg = cfglib.configlib.merge(cfg, {"run_dir": args.run_dir})
  return cfg


def _fields_epilog() -> str:
  from cqr_jax import config as cfglib
  from cqr_jax import configlib
  return "config fields and defaults:\n" + "\n".join(configlib.field_help(cfglib.RunConfig))


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
  import importlib
  module = importlib.import_module(STAGES[stage][0])
  sp = argparse.ArgumentParser(prog=f"cqr-jax {stage}", description=STAGES[stage][1],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=_fields_epilog() if getattr(module, "USES_CONFIG", True)
                               else None)
  module.add_args(sp)
  args = sp.parse_args(argv[1:])
  if getattr(args, "distributed", False):
    from cqr_jax import distributed
    distributed.initialize()
    with distributed.fail_fast():  # a crashed worker must not hang the others in a barrier
      return int(module.run(args) or 0)
  return int(module.run(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
